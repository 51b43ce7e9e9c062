"""Issue 20: what ratio auto's reuse check costs, side by side in one process. The same requests (RULER MQ 0-9,
seed 0, 4,096 tokens in 512-token chunks; SmolLM2-135M, 1 thread) run auto 0.99 three ways, in rounds: the check
from shadow suffix rows in the first pass (what ships), the check from a separate reuse pass (how it was first
built; forced here by telling the engine not to ask for the shadow), and no check. Prints each mean TTFT
(median of 3 rounds) and whether the two builds decided alike.

    .venv/bin/python scripts/reuse_check_cost.py
"""
import statistics
import time

import torch

from qcfuse.engine import FusionEngine
from qcfuse.eval.datasets import load_dataset
from qcfuse.fusion import make_selector
from qcfuse.fusion import selector as sel
from qcfuse.model.loader import load_model

torch.set_num_threads(1)
model = load_model("smollm2-135m")
engine = FusionEngine(model)
samples = load_dataset("ruler_mq", size=10, tokens=4096, chunk_tokens=512, seed=0)
layouts = []
for s in samples:
    layout = engine.layout(s.documents, s.question)
    engine.prepare_layout(layout, progress=False)
    layouts.append(layout)
original = sel.Selector.checks_reuse
times = {"shadow": [], "separate pass": [], "no check": []}
decisions = {k: [] for k in times}
for rep in range(3):
    for mode in times:
        sel.Selector.checks_reuse = original if mode == "shadow" else (lambda self, model: False)
        opts = {"reuse_check": False} if mode == "no check" else {}
        total = 0.0
        for layout in layouts:
            t0 = time.perf_counter()
            out, stats = engine.prefill(layout, make_selector("qcfuse", "auto:0.99", **opts), 1)
            total += time.perf_counter() - t0
            if rep == 0:
                decisions[mode].append((stats["passes"], int(out.logits.argmax()), stats["reuse_checked"]))
        times[mode].append(total / len(layouts))
sel.Selector.checks_reuse = original
for mode, ts in times.items():
    print(f"{mode}: mean TTFT {statistics.median(ts) * 1000:.0f} ms (median of 3 rounds: {', '.join(f'{t * 1000:.0f}' for t in ts)})")
print("same decisions, shadow vs separate pass:", decisions["shadow"] == decisions["separate pass"])
print("passes", [d[0] for d in decisions["shadow"]])
