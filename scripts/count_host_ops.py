"""Host operators (aten calls, loader thread included) per fused request, on the CPU, for a model with the
Qwen3-8B layer count and a tiny width: the count does not depend on width, so it shows on any machine what a
GPU request makes the host dispatch. Compare checkouts with PYTHONPATH, e.g.

    for w in . ../old; do PYTHONPATH=$w .venv/bin/python scripts/count_host_ops.py --label $w; done

`--selection` counts only the selection's operators (nested dispatch modes: the request's count includes them).
`--python_profile N` adds, per run, the N functions with the most own time over 5 requests (cProfile): the host's
Python work between operators, which the count does not see.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qcfuse.bench.run import load_config, random_layout, random_model
from qcfuse.cache.store import MemoryTier, TieredStore
from qcfuse.engine import FusionEngine
from qcfuse.fusion import make_selector
from qcfuse.fusion.selector import Selector

NARROW = {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="")
    ap.add_argument("--config", default="qwen3-8b", help="shipped shape whose layer count is kept")
    ap.add_argument("--tokens", default="4096,32768")
    ap.add_argument("--runs", default="reuse,epic@0.15,prophetkv@0.15,qcfuse@0.15")
    ap.add_argument("--critical_layers", default="", help="QCFuse's layers, e.g. 4,6,8,12,17,22,26,31 "
                    "(default: three over the middle, as for any model without a profile)")
    ap.add_argument("--selection", action="store_true", help="count only what the selection dispatches")
    ap.add_argument("--reuse_check", action="store_true",
                    help="every fused pass also computes plain reuse's rows, as ratio auto's reuse check does")
    ap.add_argument("--python_profile", type=int, default=0, metavar="N",
                    help="also print each run's N Python functions with the most own time (5 requests)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, config = load_config(args.config)
    loaded = random_model(name, {**config, **NARROW}, "cpu", torch.float32)
    if args.critical_layers:
        loaded.transformer.critical_layers = [int(x) for x in args.critical_layers.split(",")]
    if args.reuse_check:                   # random weights have no calibration: force the check's rows
        Selector.checks_reuse = lambda self, model: True
    if args.selection:                     # the count runs inside Selector.select only
        select = Selector.select

        def counted_select(self, inputs):
            with _Count() as count:
                out = select(self, inputs)
            counted_select.n = count.n
            return out
        Selector.select = counted_select
    for n_tokens in map(int, args.tokens.split(",")):
        layout = random_layout(n_tokens, NARROW["vocab_size"], 512, n_tokens)
        engine = FusionEngine(loaded, store=TieredStore([MemoryTier(1 << 40)]))
        engine.prepare_layout(layout, progress=False)
        counts = []
        for run in args.runs.split(","):
            method, _, ratio = run.partition("@")
            engine.prefill(layout, make_selector(method, float(ratio or 0)), 1)           # warm
            with _Count() as count:
                engine.prefill(layout, make_selector(method, float(ratio or 0)), 1)
            counts.append(f"{run} {getattr(Selector.select, 'n', 0) if args.selection else count.n}")
            if args.python_profile:
                profile = cProfile.Profile()
                with profile:
                    for _ in range(5):
                        engine.prefill(layout, make_selector(method, float(ratio or 0)), 1)
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.python_profile)
                print(f"{run} at {n_tokens} tokens, 5 requests:\n" + text.getvalue().split("\n\n", 2)[-1])
        print(f"{args.label} {name} ({config['num_hidden_layers']} layers, narrow) {n_tokens} tokens: "
              + ", ".join(counts), flush=True)


if __name__ == "__main__":
    main()
