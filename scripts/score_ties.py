"""How close QCFuse's document scores lie around the budget's edge, and whether the padded question pass (the
one CUDA graphs run, fusion/graphs.py) picks the tokens the unpadded one does. Random weights in a shipped
shape on the CPU, where graphs are emulated by tests/test_graphs.py's double; with real weights see
tests/test_graphs.py. Near-uniform scores make a selection sensitive to rounding: this measures how near.

    PYTHONPATH=. .venv/bin/python scripts/score_ties.py --tokens 1024,4096
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_graphs import RerunGraphs  # noqa: E402

from qcfuse.bench.run import load_config, random_layout, random_model  # noqa: E402
from qcfuse.engine import FusionEngine  # noqa: E402
from qcfuse.fusion import FusionInputs, ReusedKV, graphs, make_selector  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2-135m")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--critical_layers", default="3,5,7,10,14,18,22,26")
    p.add_argument("--ratio", type=float, default=0.15)
    args = p.parse_args()
    name, config = load_config(args.config)
    loaded = random_model(name, config, "cpu", torch.float32)
    loaded.transformer.critical_layers = [int(x) for x in args.critical_layers.split(",")]
    engine = FusionEngine(loaded)
    for n in (int(x) for x in args.tokens.split(",")):
        layout = random_layout(n, loaded.hf.config.vocab_size, 512, n)
        pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]

        def scores():
            inputs = FusionInputs(loaded.transformer, layout, ReusedKV(pieces, prefix_len=len(layout.prefix)))
            return make_selector("qcfuse", args.ratio).scores(inputs)
        os.environ["QCFUSE_GRAPHS"] = "0"
        exact = scores()
        os.environ.pop("QCFUSE_GRAPHS")
        graphs.BACKENDS["cpu"] = RerunGraphs()
        padded = scores()                                  # a shape's first request: the padded pass, eagerly
        del graphs.BACKENDS["cpu"]
        k = round(args.ratio * layout.n_doc_tokens)
        edge = exact.sort(descending=True).values[k - 5:k + 5]
        overlap = len(set(exact.topk(k).indices.tolist()) & set(padded.topk(k).indices.tolist())) / k
        print(f"{n} tokens: selection overlap {overlap:.3f}; padded vs unpadded max relative difference "
              f"{((padded - exact).abs() / exact.abs()).max().item():.2e}; the 10 scores around the budget's edge "
              f"span {((edge[0] - edge[-1]) / edge[-1]).item():.2e} relative")


if __name__ == "__main__":
    main()
