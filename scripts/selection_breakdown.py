"""Issue 20 on a GPU: where a query-aware selector's time goes, and what ratio auto's reuse check costs.

Random weights in a shipped shape, chunk caches in pinned host memory (as `qcfuse bench --kv-source host`).
Per context length, in one process:
  1. TTFT and selection of each variant, in interleaved rounds (the order rotates each round; medians), so
     that drift between methods is not read as a difference. Variants: reuse, ProphetKV / FuseRAG / QCFuse at
     one ratio, QCFuse with its question pass eager instead of a replayed CUDA graph, QCFuse on prompts of a
     different length on each request (both ways: they pad to one graph shape), and QCFuse at 0.02 with
     and without the reuse shadow (ratio auto's first pass, with the check and without). --extra_variants adds
     QCFuse with the loader started before selection (does streaming slow selection?) and reuse / QCFuse with
     transformers' RMSNorm modules instead of model/norm.py's fused kernel.
  2. The graph against the eager pass on one request: same selection, logits' difference.
  3. QCFuse's selection in phases, each closed by a sync of the compute stream (staging copies, the
     question's pass and scoring, the top-k read), with the host's enqueue time of each beside it.
  4. One QCFuse and one ProphetKV request under torch.profiler: tables by host time and by device time, and
     a gzipped Chrome trace per request.

    PYTHONPATH=. python3 scripts/selection_breakdown.py --tokens 4096,32768 --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qcfuse.bench.run import _hf_prefill, _store, _warm_up, interleaved, load_config, random_layout, random_model
from qcfuse.cache.loader import LayerLoader
from qcfuse.engine import FusionEngine
from qcfuse.fusion import graphs, make_selector
from qcfuse.fusion import qcfuse as qcfuse_mod
from qcfuse.fusion import selector as selector_mod
from qcfuse.fusion.fuse import synchronize
from qcfuse.fusion.selector import ReusedKV, Selector
from qcfuse.model import transformer as transformer_mod


def variants(ratio: float, extra: bool = False) -> dict:
    """name -> (method, ratio, how): how is None, or one of patched()'s. extra: also the loader and RMSNorm
    variants that the runs of 2026-11-26 settled."""
    table = {"transformers full prefill": (None, None, None),
             "reuse": ("reuse", 0.0, None),
             f"prophetkv {ratio:g}": ("prophetkv", ratio, None),
             f"fuserag {ratio:g}": ("fuserag", ratio, None),
             f"qcfuse {ratio:g}": ("qcfuse", ratio, None),
             f"qcfuse {ratio:g}, question pass eager (no CUDA graph)": ("qcfuse", ratio, "no graph"),
             f"qcfuse {ratio:g}, a prompt of another length each request": ("qcfuse", ratio, "varied"),
             f"qcfuse {ratio:g}, the same prompts, no CUDA graph": ("qcfuse", ratio, "varied no graph"),
             "qcfuse 0.02": ("qcfuse", 0.02, None),
             "qcfuse 0.02 + reuse shadow": ("qcfuse", 0.02, "shadow")}
    if extra:
        table |= {"reuse, transformers' RMSNorm": ("reuse", 0.0, "hf norm"),
                  f"qcfuse {ratio:g}, transformers' RMSNorm": ("qcfuse", ratio, "hf norm"),
                  f"qcfuse {ratio:g}, loader started before selection": ("qcfuse", ratio, "eager")}
    return table


@contextlib.contextmanager
def patched(how: str | None):
    """'eager': the loader starts streaming before selection even from memory, as it did before the shipped
    default (from memory, start at the first full-layer read). 'shadow': every pass computes plain reuse's rows
    beside it, as ratio auto's check does. 'hf norm': every RMSNorm is transformers' module (eight operators)
    instead of torch's fused kernel. 'no graph': QCFuse's question pass runs eagerly (QCFUSE_GRAPHS=0)."""
    saved_prefetch, saved_checks, saved_norm = LayerLoader.prefetch, Selector.checks_reuse, transformer_mod.rms_norm
    saved_env = os.environ.get("QCFUSE_GRAPHS")
    if how is not None and how.endswith("no graph"):
        os.environ["QCFUSE_GRAPHS"] = "0"
    elif how == "eager":
        LayerLoader.prefetch = LayerLoader.start
    elif how == "shadow":
        Selector.checks_reuse = lambda self, model: True
    elif how == "hf norm":
        transformer_mod.rms_norm = lambda module, x: module(x)
    try:
        yield
    finally:
        LayerLoader.prefetch, Selector.checks_reuse, transformer_mod.rms_norm = saved_prefetch, saved_checks, saved_norm
        if saved_env is None:
            os.environ.pop("QCFUSE_GRAPHS", None)
        else:
            os.environ["QCFUSE_GRAPHS"] = saved_env


def shorter(layout, i: int):
    """layout with its last chunk 5*i tokens shorter and its suffix i tokens shorter: another prompt length
    that pads to the same graph shape as layout (fusion/graphs.py)."""
    from qcfuse.prompt import PromptLayout
    suffix = layout.suffix[:len(layout.suffix) - i]
    return PromptLayout(layout.prefix, layout.chunks[:-1] + [layout.chunks[-1][:len(layout.chunks[-1]) - 5 * i]],
                        suffix, (layout.question[0], min(layout.question[1], len(suffix))))


def timed_rounds(engine, layout, table: dict, rounds: int, hf, varied: list | None = None) -> dict:
    """TTFT, selection and load wait (ms) of every variant, rounds interleaved (medians, and every TTFT).
    Variants whose `how` starts with 'varied' take the next prompt of `varied` on each request."""
    device = engine.model.transformer.device
    ids = layout.ids.to(device)
    turns = {}

    def run(method, ratio, how) -> dict:
        if how is not None and how.startswith("varied"):
            turns[how] = turns.get(how, -1) + 1
            with patched(how):
                return engine.prefill(varied[turns[how] % len(varied)], make_selector(method, ratio), 1)[1]
        if method is None:                               # transformers' own forward
            synchronize(device)
            t0 = time.perf_counter()
            _hf_prefill(hf, ids)
            synchronize(device)
            return {"ttft_s": time.perf_counter() - t0, "selection_s": 0.0, "io_wait_s": 0.0}
        with patched(how):
            return engine.prefill(layout, make_selector(method, ratio), 1)[1]
    timed = interleaved({name: functools.partial(run, *spec) for name, spec in table.items()}, rounds, warmup=1)
    out = {}
    for name, runs in timed.items():
        ms = {key: [1000 * r[stat] for r in runs]
              for key, stat in (("ttft", "ttft_s"), ("select", "selection_s"), ("wait", "io_wait_s"))}
        out[name] = {key: statistics.median(v) for key, v in ms.items()} | {"ttft_all": ms["ttft"]}
    return out


def phases(engine, layout, ratio: float, device, repeats: int) -> dict:
    """QCFuse's selection in synced phases: (wall ms, host enqueue ms) per phase, medians."""
    log: dict[str, list] = {}

    def wrap(owner, attr, label, wait=None):
        fn = getattr(owner, attr)

        def inner(*args, **kwargs):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            t1 = time.perf_counter()
            synchronize(device)
            if wait is not None:
                wait(args)
            log.setdefault(label, []).append((1000 * (time.perf_counter() - t0), 1000 * (t1 - t0)))
            return out
        setattr(owner, attr, inner)
        return fn

    def loader_stream(args):                     # stage_query's copies go on the loader's stream
        stream = args[0].loader.stream
        if stream is not None:
            stream.synchronize()
    saved = [(ReusedKV, "stage_query", wrap(ReusedKV, "stage_query", "stage query cache (copies)", loader_stream)),
             (qcfuse_mod, "question_pass", wrap(qcfuse_mod, "question_pass", "question pass + scoring")),
             (selector_mod, "top_positions", wrap(selector_mod, "top_positions", "top-k read"))]
    try:
        for _ in range(repeats + 1):
            _, stats = engine.prefill(layout, make_selector("qcfuse", ratio), 1)
            log.setdefault("selection (stats)", []).append((1000 * stats["selection_s"], 0.0))
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    return {label: [statistics.median(x[0] for x in v[1:]), statistics.median(x[1] for x in v[1:])]
            for label, v in log.items()}


def graph_check(engine, layout, ratio: float) -> dict:
    """QCFuse with its question pass replayed as a graph (padded to its bucket) against the eager, unpadded
    pass, same request: the selected tokens and the first-token logits (the replay comes from timed_rounds'
    earlier requests of this shape)."""
    with patched("no graph"):
        eager, _ = engine.prefill(layout, make_selector("qcfuse", ratio), 1)
    before = dict(graphs.counts(engine.model.transformer))
    graphed, _ = engine.prefill(layout, make_selector("qcfuse", ratio), 1)
    after = graphs.counts(engine.model.transformer)
    same = set(eager.recomputed.tolist()) & set(graphed.recomputed.tolist())
    return {"replayed": after.get("replay", 0) > before.get("replay", 0), "graphs": graphs.stats(engine.model.transformer),
            "same_selection": torch.equal(eager.recomputed, graphed.recomputed),
            "selection_overlap": len(same) / max(1, eager.recomputed.numel()),
            "logits_max_abs_diff": (eager.logits.float() - graphed.logits.float()).abs().max().item(),
            "same_first_token": int(eager.logits.reshape(-1, eager.logits.shape[-1])[-1].argmax())
            == int(graphed.logits.reshape(-1, graphed.logits.shape[-1])[-1].argmax()),
            "failures": list(graphs.FAILURES)}


def profiled(engine, layout, method: str, ratio: float, device, out_dir: Path, tag: str) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    saved = Selector.select

    def select(self, inputs):
        with record_function("## select"):
            return saved(self, inputs)
    Selector.select = select
    try:
        engine.prefill(layout, make_selector(method, ratio), 1)
        synchronize(device)
        with profile(activities=activities) as prof:
            engine.prefill(layout, make_selector(method, ratio), 1)
            synchronize(device)
    finally:
        Selector.select = saved
    trace = out_dir / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    averages = prof.key_averages()
    tables = {"by host time": averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)}
    if device.type == "cuda":
        tables["by device time"] = averages.table(sort_by="self_device_time_total", row_limit=20,
                                                  max_name_column_width=50)
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", default="4096,32768")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--critical_layers", default="4,6,8,12,17,22,26,31",
                   help="QCFuse's layers (default: SmolLM2's eight at the same depth fractions of Qwen3-8B)")
    p.add_argument("--chunk_tokens", type=int, default=512)
    p.add_argument("--profile_tokens", default="4096,32768",
                   help="lengths at which to profile (tables and gzipped traces); '' for none")
    p.add_argument("--extra_variants", action="store_true",
                   help="also the loader and RMSNorm variants (settled on 2026-11-26)")
    p.add_argument("--out", default="selection-out")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, config = load_config(args.config)
    loaded = random_model(name, config, str(device), dtype)
    loaded.transformer.critical_layers = [int(x) for x in args.critical_layers.split(",")]
    kv = "host"
    cfg = argparse.Namespace(kv_source=kv, device=str(device), cache_dir=None)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "config": name, "dtype": str(dtype), "critical_layers": loaded.transformer.critical_layers,
              "ratio": args.ratio, "rounds": args.rounds, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        _warm_up(loaded, _store(cfg, tmp), loaded.hf.config.vocab_size, 1000)
        for n in [int(x) for x in args.tokens.split(",")]:
            layout = random_layout(n, loaded.hf.config.vocab_size, args.chunk_tokens, n)
            engine = FusionEngine(loaded, store=_store(cfg, tmp))
            engine.prepare_layout(layout, progress=False)
            varied = [shorter(layout, i) for i in range(1, 5)]
            for v in varied:
                engine.prepare_layout(v, progress=False)
            t0 = time.perf_counter()
            res = {"tokens": n, "rounds": timed_rounds(engine, layout, variants(args.ratio, args.extra_variants),
                                                    args.rounds, loaded.hf, varied),
                   "varied_lengths": [[v.context_len, len(v.suffix)] for v in varied]}
            res["graph_check"] = graph_check(engine, layout, args.ratio)
            res["phases"] = phases(engine, layout, args.ratio, device, 5)
            if str(n) in args.profile_tokens.split(","):
                res["profiles"] = {m: profiled(engine, layout, m, args.ratio, device, out_dir, f"{m}_{n}")
                                   for m in ("qcfuse", "prophetkv")}
            res["seconds"] = time.perf_counter() - t0
            record["results"].append(res)
            print(f"\n{n} tokens, {record['device']}, critical layers {record['critical_layers']}: "
                  f"median of {args.rounds} interleaved rounds")
            print(f"  {'variant':58s} {'TTFT':>8s} {'select':>8s} {'wait':>7s}   all TTFTs")
            for vname, d in res["rounds"].items():
                print(f"  {vname:58s} {d['ttft']:8.1f} {d['select']:8.1f} {d['wait']:7.1f}   "
                      + " ".join(f"{t:.0f}" for t in d["ttft_all"]))
            print(f"  graph vs eager question pass: {res['graph_check']}")
            print("  QCFuse selection in synced phases (wall ms, host enqueue ms):")
            for label, (wall, host) in res["phases"].items():
                print(f"    {label:32s} {wall:8.1f} {host:8.1f}")
            (out_dir / "selection_breakdown.json").write_text(json.dumps(record, indent=1))
            for m, tables in res.get("profiles", {}).items():
                with open(out_dir / "profiles.txt", "a") as f:
                    for label, table in tables.items():
                        f.write(f"\n## {m} {args.ratio:g} at {n} tokens, {label}\n{table}\n")


if __name__ == "__main__":
    main()
