"""Numeric self-check of the engine on a given model, against transformers' own forward on the same weights.

`qcfuse check --model M` runs these before a user trusts a model; the test suite asserts the same facts.
"""
from __future__ import annotations

import torch

from .engine import FusionEngine
from .fusion import make_selector
from .model.loader import LoadedModel
from .prompt import PromptLayout

CHECK_DOCUMENTS = [
    "The lighthouse on Varna point was built in 1857 by the harbour engineer Ilse Marrow. Its lamp burned "
    "whale oil until 1921, when an electric lens from Glasgow replaced it. The keeper's log survives.",
    "Ilse Marrow later moved to Tromsø, where she designed a granary with a copper roof. The granary still "
    "stores barley for the town, and its roof has turned a deep green over the decades.",
    "Copper roofs turn green because the metal slowly reacts with water, carbon dioxide and sulfur in the "
    "air, forming a patina that protects the metal underneath from further corrosion.",
]
CHECK_QUESTION = "What did the engineer who built the Varna lighthouse design in Tromsø?"


def tolerance(model: LoadedModel) -> float:
    """Max abs first-token logit difference accepted as 'the same computation'."""
    return 1e-4 if model.transformer.dtype == torch.float32 else 0.5


@torch.inference_mode()
def reference_logits(model: LoadedModel, layout: PromptLayout) -> torch.Tensor:
    """transformers' own forward over the same token ids: first-token logits [vocab]."""
    return model.hf(layout.ids[None].to(model.transformer.device)).logits[0, -1].float().cpu()


@torch.inference_mode()
def reference_greedy(model: LoadedModel, layout: PromptLayout, n: int) -> list[int]:
    ids = layout.ids[None].to(model.transformer.device)
    out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=model.tokenizer.eos_token_id, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def logit_distance(model: LoadedModel, engine: FusionEngine, layout: PromptLayout, method: str, ratio: float,
                   ref: torch.Tensor, max_new_tokens: int = 1):
    gen = engine.generate_layout(layout, make_selector(method, ratio), max_new_tokens)
    return (gen.first_logits.cpu() - ref).abs().max().item(), gen


@torch.inference_mode()
def reposition_error(model: LoadedModel, ids: list[int], offset: int) -> float:
    """Relative max difference (max |d| / max |value|) between a chunk's K/V cached at 0 with K re-rotated to
    `offset`, and the K/V computed there; the chunk is prefilled alone both times."""
    t = model.transformer
    ids_t = torch.tensor(ids)
    k0, v0, _ = t.prefill(ids_t, start=0)
    kp, vp, _ = t.prefill(ids_t, start=offset)
    pos = torch.arange(offset, offset + len(ids), device=t.device)
    err = 0.0
    for layer in range(t.n_layers):
        moved, in_place = t.rope(layer, k0[layer], pos), t.rope(layer, kp[layer], pos)
        err = max(err, _rel(moved, in_place), _rel(v0[layer], vp[layer]))
    return err


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_checks(model: LoadedModel) -> list[dict]:
    engine = FusionEngine(model)
    tol = tolerance(model)
    layout = engine.layout(CHECK_DOCUMENTS, CHECK_QUESTION)
    ref = reference_logits(model, layout)
    results = []

    def record(name: str, passed: bool, detail: str):
        results.append({"name": name, "passed": bool(passed), "detail": detail})

    d_full, full = logit_distance(model, engine, layout, "fullcomp", 1.0, ref, max_new_tokens=16)
    hf_tokens = reference_greedy(model, layout, len(full.token_ids))
    record("full prefill = transformers", d_full <= tol and full.token_ids == hf_tokens,
           f"max |dlogit| {d_full:.2e} (tol {tol:.0e}); {len(hf_tokens)}-token greedy continuation "
           f"{'identical' if full.token_ids == hf_tokens else 'DIFFERS'}")
    for method in ("cacheblend", "epic"):
        d, _ = logit_distance(model, engine, layout, method, 1.0, ref)
        record(f"recompute-all through the fuse loop ({method}, ratio 1.0) = full prefill", d <= tol,
               f"max |dlogit| {d:.2e}")
    chunk = layout.chunks[1]
    err = max(reposition_error(model, chunk, p) for p in (1, 37, len(layout.prefix) + 200))
    rel_tol = 1e-5 if model.transformer.dtype == torch.float32 else 2e-2
    record("re-positioned chunk cache = cache computed in place", err <= rel_tol,
           f"max relative |dK|,|dV| {err:.1e} (tol {rel_tol:.0e}) at offsets 1, 37, {len(layout.prefix) + 200}")
    single = PromptLayout(prefix=[], chunks=[layout.prefix + layout.chunks[0]], suffix=layout.suffix)
    d1, _ = logit_distance(model, engine, single, "reuse", 0.0, reference_logits(model, single))
    record("one chunk at the start, reuse = full prefill", d1 <= tol, f"max |dlogit| {d1:.2e}")
    dist = {r: logit_distance(model, engine, layout, "cacheblend", r, ref)[0] for r in (0.0, 0.25, 0.5, 1.0)}
    d_reuse = logit_distance(model, engine, layout, "reuse", 0.0, ref)[0]
    record("several chunks, reuse differs from full prefill (fusion matters)", d_reuse > 1e-3,
           f"max |dlogit| {d_reuse:.3f}")
    record("recomputing more tokens moves closer to full prefill",
           dist[1.0] <= tol and dist[0.5] < dist[0.0] and dist[0.25] < dist[0.0],
           "cacheblend max |dlogit| at ratio " + ", ".join(f"{r}: {d:.3g}" for r, d in dist.items()))
    return results
