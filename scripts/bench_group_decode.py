"""Reading an encoded entry (disk tier) a group of layers at a time, side by side in one process: the group
decoded straight into one tensor (BlobReader.layers, codec.decode_layers) against the generic read that decodes
each layer and stacks them (EntryReader.layers). Random entries in the shape of a 512-token chunk of SmolLM2-135M
(fp32) and of Qwen3-8B (bf16); reads interleaved, median of 15; the files stay in the OS page cache, so this is
the host work of a read, not the device's.

    PYTHONPATH=. .venv/bin/python scripts/bench_group_decode.py
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from qcfuse.cache.disk import DiskTier
from qcfuse.cache.kv import ChunkKV
from qcfuse.cache.loader import GROUP_LAYERS
from qcfuse.cache.store import EntryReader

SHAPES = {"SmolLM2-135M chunk, fp32": (30, 3, 512, 64, torch.float32),
          "Qwen3-8B chunk, bf16": (36, 8, 512, 128, torch.bfloat16)}


def main() -> None:
    torch.set_num_threads(1)
    for name, (n_layers, heads, n, dim, dtype) in SHAPES.items():
        tier = DiskTier(tempfile.mkdtemp())
        entry = ChunkKV(torch.randn(n_layers, heads, n, dim).to(dtype), torch.randn(n_layers, heads, n, dim).to(dtype),
                        {"anchor_rank": torch.zeros(n_layers, n, dtype=torch.int32)})
        key = "ab" + "0" * 38
        tier.put(key, "fingerprint", entry)
        times = {"decode and stack each layer": [], "one decode per group": []}
        for _ in range(15):
            for label in times:
                reader = tier.open(key, "fingerprint")
                read = reader.layers if label == "one decode per group" else \
                    (lambda start, stop, reader=reader: EntryReader.layers(reader, start, stop))
                t0 = time.perf_counter()
                for start in range(0, n_layers, GROUP_LAYERS):
                    read(start, min(n_layers, start + GROUP_LAYERS))
                times[label].append(time.perf_counter() - t0)
        stacked, direct = (1000 * statistics.median(t) for t in times.values())
        print(f"{name}, all {n_layers} layers in groups of {GROUP_LAYERS}: decode and stack {stacked:.1f} ms, "
              f"one decode per group {direct:.1f} ms ({stacked / direct:.2f}x)")


if __name__ == "__main__":
    main()
