"""`qcfuse profile`: find a model's critical layers for QCFuse, measured on a calibration set.

Criterion (documented and measured): for each layer l, select the top `ratio` document tokens by the
question's attention at layer l alone (full view), fuse with exactly those tokens, and measure the KL
divergence of the first-token distribution from full prefill. The critical layers are the `n` layers with
the lowest mean KL: the layers whose question attention best predicts which tokens matter for the answer.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import FusionEngine
from .errors import QcfuseError
from .fusion import ReusedKV, Selector, make_selector
from .fusion.probe import attention_probs, run_probe, top_positions

PROFILE_FILE = "qcfuse-profile.json"
PACKAGED = Path(__file__).resolve().parent / "profiles"


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
        "criterion": f"lowest mean first-token KL to full prefill when fusing the top {ratio:g} document tokens "
                     "chosen by the question's attention at that single layer (full view)",
        "ratio": ratio,
        "samples": len(samples),
        "mean_kl_per_layer": [round(float(x), 6) for x in mean_kl],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def load_profile(model_dir: Path | None, alias: str | None) -> dict | None:
    """The profile stored with the model, else the one shipped for a built-in alias."""
    for path in ([model_dir / PROFILE_FILE] if model_dir else []) + ([PACKAGED / f"{alias}.json"] if alias else []):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def musique_samples(path: Path, n: int, passages: int) -> list[tuple[list[str], str]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QcfuseError(f"cannot read calibration data {path}: {exc}") from None
    out = []
    for item in data[:n]:
        docs = [f"{c['title']}\n{c['text']}" for c in item["ctxs"][:passages]]
        out.append((docs, item["question"]))
    if not out:
        raise QcfuseError(f"no samples in {path}")
    return out
