"""Time fused requests in one process (median of repeated runs after one warm-up), to compare two checkouts
side by side on a noisy machine: run it alternately from each, e.g.

    for w in . ../old; do PYTHONPATH=$w .venv/bin/python scripts/time_requests.py --label $w; done

SmolLM2-135M by default (--model), a random 4K-token RAG prompt, chunk caches in memory. A method is
NAME@RATIO, RATIO a number or auto[:TARGET], e.g. qcfuse@auto:0.99.
"""
from __future__ import annotations

import argparse
import statistics
import time

from qcfuse import FusionEngine, load_model
from qcfuse.bench.run import random_layout
from qcfuse.fusion import make_selector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=4, help="timed runs after the warm-up, per method")
    ap.add_argument("--methods", default="epic@0.15,qcfuse@0.15,reuse@0")
    args = ap.parse_args()
    model = load_model(args.model, quiet=True)
    engine = FusionEngine(model)
    layout = random_layout(args.tokens, model.hf.config.vocab_size, 512, args.tokens)
    engine.prepare_layout(layout)
    parts = []
    for spec in args.methods.split(","):
        method, _, ratio = spec.partition("@")
        ttft, selection = [], []
        for i in range(args.runs + 1):
            t0 = time.perf_counter()
            spec_ratio = ratio if ratio.startswith("auto") else float(ratio or 0)
            _, stats = engine.prefill(layout, make_selector(method, spec_ratio), 1)
            if i:                                    # the first run is the warm-up
                ttft.append(time.perf_counter() - t0)
                selection.append(stats["selection_s"])
        parts.append(f"{spec} {1000 * statistics.median(ttft):.0f} ms (selection "
                     f"{1000 * statistics.median(selection):.0f} ms)")
    print(args.label, "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
