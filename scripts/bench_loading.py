"""Layer-wise KV loading, side by side in one run: fused TTFT with every chunk cache in memory, read from disk
with loading overlapped with compute, and read from disk one layer at a time only when compute needs it.

    .venv/bin/python scripts/bench_loading.py                   # musique_s sample 0 (10 passages), 3 repeats
    .venv/bin/python scripts/bench_loading.py --methods reuse,qcfuse --repeats 5 --json out.json

Disk runs drop the entry files from the OS page cache first (posix_fadvise DONTNEED), so they really read the
device. Runs are interleaved (memory, disk overlapped, disk serial, memory, ...) and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def drop_page_cache(root: Path) -> None:
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/musique_s.json"))
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--methods", default="reuse,qcfuse")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache_dir", help="where the disk tier lives (default: a fresh temporary directory)")
    ap.add_argument("--json", help="also write the records here")
    args = ap.parse_args()

    from qcfuse import FusionEngine, load_model, make_selector
    from qcfuse.cache.disk import DiskTier
    from qcfuse.cache.store import MemoryTier, TieredStore

    item = json.loads(Path(args.data).read_text())[args.sample]
    docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"]]
    model = load_model("smollm2-135m", quiet=True)
    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="qcfuse-bench-"))
    memory = FusionEngine(model, store=TieredStore([MemoryTier()]))
    disk_store = TieredStore([DiskTier(root)])                # no memory tier: every request reads the disk
    setups = {
        "memory": memory,
        "disk, overlapped": FusionEngine(model, store=disk_store, background_loading=True),
        "disk, not overlapped": FusionEngine(model, store=disk_store, background_loading=False),
    }
    memory.warmup()
    memory.prepare(docs)
    setups["disk, overlapped"].prepare(docs)
    layout = memory.layout(docs, item["question"])
    print(f"{layout.n_tokens} prompt tokens in {len(docs)} chunks; disk tier at {root}; "
          f"{args.repeats} interleaved repeats, median shown")

    records = []
    for method in args.methods.split(","):
        for _ in range(args.repeats):
            for name, engine in setups.items():
                if name.startswith("disk"):
                    drop_page_cache(root)
                gen = engine.generate_layout(layout, make_selector(method, args.ratio), 1)
                records.append({"method": method, "setup": name, "ttft_s": gen.stats["ttft_s"],
                                "io_wait_s": gen.stats["io_wait_s"], "bytes_loaded": gen.stats["bytes_loaded"],
                                "selection_s": gen.stats["selection_s"], "hits": gen.stats["hits_by_tier"]})

    print(f"\n{'method':8} {'setup':22} {'TTFT ms':>9} {'vs memory':>10} {'I/O wait ms':>12} {'MB loaded':>10}")
    for method in args.methods.split(","):
        base = None
        for name in setups:
            rs = [r for r in records if r["method"] == method and r["setup"] == name]
            ttft = statistics.median(r["ttft_s"] for r in rs)
            base = base or ttft
            print(f"{method:8} {name:22} {ttft * 1000:9.1f} {ttft / base:9.2f}x "
                  f"{statistics.median(r['io_wait_s'] for r in rs) * 1000:12.1f} {rs[0]['bytes_loaded'] / 1e6:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
