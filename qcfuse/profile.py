"""`qcfuse profile` and `qcfuse calibrate`: a model's calibration for QCFuse's critical layers and for ratio auto.

Criterion (documented and measured): for each layer l, select the top `ratio` document tokens by the
question's attention at layer l alone (full view), fuse with exactly those tokens, and measure the KL
divergence of the first-token distribution from full prefill. The critical layers are the `n` layers with
the lowest mean KL: the layers whose question attention best predicts which tokens matter for the answer.

Ratio auto (fusion/budget.py): per calibration sample and method, the smallest ratio of a grid whose top-scored
tokens keep full prefill's first token, read as the share of the method's scores those tokens hold.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import FusionEngine
from .errors import QcfuseError
from .fusion import ReusedKV, Selector, make_selector
from .fusion.budget import mass_of_top
from .fusion.probe import attention_probs, run_probe, top_positions


class _Fixed(Selector):
    """Recompute a given set of positions (profiling only; not registered)."""
    name = "fixed"

    def __init__(self, positions: torch.Tensor):
        super().__init__(0.0)
        self.positions = positions

    def select(self, inputs):
        return self.positions


def kl_first_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P || Q) of the first-token distributions, P the full-prefill reference."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def per_layer_scores(engine: FusionEngine, layout, reused: ReusedKV) -> torch.Tensor:
    """Question attention on each document token at every layer (full view): [L, n_doc], rows sum to 1."""
    model = engine.model.transformer
    ctx_pos = torch.arange(layout.context_len)
    q_pos = layout.suffix_positions()
    doc0 = len(layout.prefix)
    out = torch.zeros(model.n_layers, layout.n_doc_tokens)

    def on_layer(layer, q):
        keys = model.rope(layer, reused.layer(layer)[0], ctx_pos)
        s = attention_probs(model, layer, q, q_pos, keys, ctx_pos)[:, :, doc0:].mean(dim=(0, 1))
        out[layer] = s / s.sum().clamp_min(1e-30)

    run_probe(model, torch.tensor(layout.suffix), q_pos, lambda layer: (ctx_pos, *reused.layer(layer)),
              model.n_layers, on_layer)
    return out


def profile_model(engine: FusionEngine, samples: list[tuple[list[str], str]], ratio: float = 0.15,
                  n_critical: int = 3, progress: bool = True) -> dict:
    model = engine.model.transformer
    kls = torch.zeros(len(samples), model.n_layers)
    t0 = time.perf_counter()
    for i, (docs, question) in enumerate(tqdm(samples, desc="profiling layers", unit="sample", disable=not progress)):
        layout = engine.layout(docs, question)
        full = engine.generate_layout(layout, make_selector("fullcomp"), 1).first_logits
        pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks] if ids]
        scores = per_layer_scores(engine, layout, ReusedKV(pieces, len(layout.prefix)))
        budget = int(round(ratio * layout.n_doc_tokens))
        for layer in range(model.n_layers):
            chosen = top_positions(scores[layer], layout.doc_positions(), budget)
            fused = engine.generate_layout(layout, _Fixed(chosen), 1).first_logits
            kls[i, layer] = kl_first_token(full, fused)
    mean_kl = kls.mean(dim=0)
    critical = sorted(mean_kl.argsort()[:n_critical].tolist())
    return {
        "critical_layers": critical,
        "critical_layers_choice": f"the {n_critical} layers of lowest mean KL by the criterion below",
        "lowest_kl_layers": critical,
        "criterion": f"lowest mean first-token KL to full prefill when fusing the top {ratio:g} document tokens "
                     "chosen by the question's attention at that single layer (full view)",
        "ratio": ratio,
        "samples": len(samples),
        "mean_kl_per_layer": [round(float(x), 6) for x in mean_kl],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def musique_samples(path: Path, n: int, passages: int, first: int = 0) -> list[tuple[list[str], str]]:
    if first < 0 or n < 1:
        raise QcfuseError("--first must be at least 0 and --samples at least 1")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QcfuseError(f"cannot read calibration data {path}: {exc}") from None
    out = []
    for item in data[first:first + n]:
        docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"][:passages]]
        out.append((docs, item["question"]))
    if not out:
        raise QcfuseError(f"no samples in {path}")
    return out


# -- ratio auto ------------------------------------------------------------------------------------------------
AUTO_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
AUTO_TARGETS = (0.8, 0.9, 0.95, 0.99)


def needed_share(engine: FusionEngine, layout, scores: torch.Tensor, full_logits: torch.Tensor,
                 grid=AUTO_GRID) -> dict:
    """The smallest grid ratio whose top-scored tokens, fused, give full prefill's first token (1.0 when none
    does), and the share of the scores' total those tokens hold: what ratio auto must reach on this sample."""
    n_doc, top1 = layout.n_doc_tokens, int(full_logits.argmax())
    tried = []
    for ratio in grid:
        k = int(round(ratio * n_doc))
        fused = engine.generate_layout(layout, _Fixed(top_positions(scores, layout.doc_positions(), k)), 1)
        agrees = int(fused.first_logits.argmax()) == top1
        tried.append({"ratio": ratio, "agrees": agrees, "kl": round(kl_first_token(full_logits, fused.first_logits), 6)})
        if agrees:
            return {"ratio": ratio, "mass": round(mass_of_top(scores, k), 6), "tried": tried}
    return {"ratio": 1.0, "mass": 1.0, "tried": tried}


def calibrate_auto(engine: FusionEngine, samples: list, methods: list[str], targets=AUTO_TARGETS,
                   grid=AUTO_GRID, progress: bool = True, on_sample=None) -> dict:
    """Per method, the attention share that served each calibration sample, and its t-quantile per target t
    (the higher neighbour: on the calibration set at least a share t of samples needed no more)."""
    from .fusion import FusionInputs
    needed: dict[str, list[float]] = {m: [] for m in methods}
    scoring = {m: make_selector(m, 0.15).scoring(engine.model.transformer) for m in methods}
    t0 = time.perf_counter()
    for sample in tqdm(samples, desc="calibrating ratio auto", unit="sample", disable=not progress):
        layout = engine.layout(sample.documents, sample.question)
        full = engine.generate_layout(layout, make_selector("fullcomp"), 1).first_logits
        pieces = [engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks] if ids]
        for method in methods:
            selector = make_selector(method, 0.15)
            scores = selector.scores(FusionInputs(engine.model.transformer, layout,
                                                  ReusedKV(pieces, len(layout.prefix))))
            found = needed_share(engine, layout, scores, full, grid)
            needed[method].append(found["mass"])
            if on_sample is not None:
                on_sample({"sample": sample.id, "method": method, **found})
    out = {}
    for method, masses in needed.items():
        ordered = sorted(masses)
        quantile = [ordered[min(len(ordered) - 1, max(0, math.ceil(t * len(ordered)) - 1))] for t in targets]
        out[method] = {"targets": list(targets), "mass": [round(m, 6) for m in quantile], "samples": len(masses),
                       "grid": list(grid), **({"scoring": scoring[method]} if scoring[method] else {})}
    return {"auto": out, "seconds": round(time.perf_counter() - t0, 1)}
