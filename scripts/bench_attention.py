"""Attention alone, per request (every layer), through each kernel of qcfuse's attention seam, side by side.

Real 8B attention shapes (default Qwen3-8B: 36 layers, 32 query / 8 key-value heads of 128), bf16, random data.
For each context length: full prefill (all rows, causal) and scattered rows (a selector's share of the
document tokens plus a 64-token suffix), each kernel's time for all layers and its error against a float32
reference of one layer, next to the visible-pair FLOP floor. FlexAttention's compile is timed on its own (first
call per new shape), so recompiles show. Usage (GPU):

    PYTHONPATH=. python3 scripts/bench_attention.py --tokens 4096,16384,32768 --ratio 0.15 --out attention.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qcfuse.model import attention as att
from qcfuse.model.attention import RowAttention, visible


def timed(fn, device, repeats: int = 5) -> tuple[float, object]:
    """Median seconds of fn() over `repeats` after one untimed call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def scattered_rows(n_keys: int, ratio: float, suffix: int, g: torch.Generator) -> torch.Tensor:
    docs = n_keys - suffix
    picked = torch.randperm(docs, generator=g)[: round(ratio * docs)].sort().values
    return torch.cat([picked, torch.arange(docs, n_keys)])


def reference(q, k, v, rows, n_keys, scale):
    """float32 attention of one layer with the row-level mask (SDPA on upcast inputs, KV heads repeated), for
    the given rows only (a sample keeps the float32 scores small at 32K)."""
    group = q.shape[0] // k.shape[0]
    mask = visible(rows.to(q.device), torch.arange(n_keys, device=q.device), None)
    return torch.nn.functional.scaled_dot_product_attention(
        q.float()[None], k.float().repeat_interleave(group, 0)[None], v.float().repeat_interleave(group, 0)[None],
        attn_mask=mask[None, None], scale=scale)[0]


def copy_bandwidth(device, gib: float = 1.0) -> dict:
    """Host-to-device bandwidth from pinned memory: one large copy, and the same bytes as 1 MiB pieces (what
    streaming chunk caches layer by layer issues)."""
    n = int(gib * (1 << 30)) // 2
    host = torch.empty(n, dtype=torch.bfloat16).pin_memory()
    dev = torch.empty(n, dtype=torch.bfloat16, device=device)
    big, _ = timed(lambda: dev.copy_(host, non_blocking=True), device)
    piece = (1 << 20) // 2

    def pieces():
        for a in range(0, n, piece):
            dev[a:a + piece].copy_(host[a:a + piece], non_blocking=True)
    small, _ = timed(pieces, device, repeats=3)
    row = {"shape": "host-to-device copy", "GB_per_s_one_copy": 2 * n / big / 1e9,
           "GB_per_s_1MiB_pieces": 2 * n / small / 1e9}
    print(f"pinned host -> device: {row['GB_per_s_one_copy']:.1f} GB/s in one copy, "
          f"{row['GB_per_s_1MiB_pieces']:.1f} GB/s in 1 MiB pieces", flush=True)
    return row


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tflops", type=float, default=700.0, help="matrix rate for the FLOP floor")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = args.head_dim ** -0.5
    g = torch.Generator().manual_seed(0)
    rows_out = []
    if device.type == "cuda":
        rows_out.append(copy_bandwidth(device))
    for n_keys in [int(t) for t in args.tokens.split(",")]:
        # laid out as the engine hands them over: keys/values are slices of a larger KV buffer (room for the
        # decoded tokens), queries a transposed projection
        sets = [tuple(torch.randn(args.kv_heads, n_keys + 33, args.head_dim, device=device, dtype=dtype)[:, :n_keys]
                      for _ in range(2)) for _ in range(4)]
        for shape, rows in (("all rows, causal", torch.arange(n_keys)),
                            (f"scattered rows (ratio {args.ratio:g})", scattered_rows(n_keys, args.ratio, 64, g))):
            n = rows.numel()
            q = torch.randn(n, args.heads, args.head_dim, device=device, dtype=dtype).transpose(0, 1)
            pairs = int((rows + 1).sum())                      # visible (row, key) pairs
            floor_ms = 1000 * 4 * pairs * args.head_dim * args.heads * args.layers / (args.tflops * 1e12)
            sample = torch.linspace(0, n - 1, min(n, 512)).round().long().unique()
            ref = reference(q[:, sample.to(device)], *sets[0], rows[sample], n_keys, scale)
            kernels = ["flex", "blocked@1024", "blocked@4096"] if shape.startswith("scattered") else ["auto"]
            for kernel in kernels:
                kernel, _, block = kernel.partition("@")
                att.CUDA_BLOCK = att.CPU_BLOCK = int(block or 1024)
                t_plan = time.perf_counter()
                plan = RowAttention(rows, n_keys, device, dtype, kernel=None if kernel == "auto" else kernel)
                kernel_obj = plan.kernel_for(None)
                t_plan = time.perf_counter() - t_plan
                t_first = time.perf_counter()
                out = plan(None, q, *sets[0], scale)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_first = time.perf_counter() - t_first
                err = float((out[:, sample.to(device)].float() - ref).norm() / ref.norm())

                def all_layers():
                    for layer in range(args.layers):
                        k, v = sets[layer % len(sets)]
                        plan(None, q, k, v, scale)
                seconds, _ = timed(all_layers, device)
                name = type(kernel_obj).__name__.strip("_") + (f"@{block}" if block else "")
                row = {"tokens": n_keys, "shape": shape, "rows": n, "kernel": name,
                       "ms_all_layers": 1000 * seconds, "floor_ms": floor_ms, "first_call_ms": 1000 * t_first,
                       "plan_ms": 1000 * t_plan, "rel_err_vs_fp32": err}
                rows_out.append(row)
                print(f"{n_keys:>6} {shape:<28} {n:>6} rows  {row['kernel']:<13} {row['ms_all_layers']:8.1f} ms "
                      f"(floor {floor_ms:6.1f})  first call {row['first_call_ms']:8.1f} ms  plan "
                      f"{row['plan_ms']:6.1f} ms  rel err {err:.1e}", flush=True)
            del q, ref
        del sets
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "flex_broken": att._FLEX_BROKEN, "results": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
