"""Numeric self-check of the engine on a given model, against transformers' own forward on the same weights.

`qcfuse check --model M` runs these before a user trusts a model; the test suite asserts the same facts.
"""
from __future__ import annotations

import contextlib

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


# -- precision: is qcfuse's rounding error transformers' own? ------------------------------------------------
LOW_PRECISION_FACTOR = 1.5     # qcfuse's low-precision error may be at most this times transformers' own
FP32_TOLERANCE = 1e-4          # max |logit diff| accepted in float32, where both should agree to rounding


@contextlib.contextmanager
def upcast_parameters(hf_model):
    """The model's parameters in float32 for the duration (buffers such as RoPE frequencies untouched); the
    low-precision -> float32 -> low-precision round trip restores every weight bit for bit."""
    dtypes = {}
    for p in hf_model.parameters():
        dtypes[p] = p.dtype
        p.data = p.data.float()
    try:
        yield hf_model
    finally:
        for p, dtype in dtypes.items():
            p.data = p.data.to(dtype)


def _errors(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    logits, ref = logits.float().cpu(), ref.float().cpu()
    return {"rel_err": float((logits - ref).norm() / ref.norm().clamp_min(1e-30)),
            "max_abs": float((logits - ref).abs().max()), "top1": int(logits.argmax())}


@torch.inference_mode()
def precision_check(engine: FusionEngine, layout: PromptLayout) -> dict:
    """First-token logits of qcfuse full prefill and of fusion with every token recomputed, judged against a
    float32 forward of the same weights beside transformers' own forward in the model's dtype.

    In bfloat16/float16 both carry rounding error, so qcfuse passes when its relative error is within
    LOW_PRECISION_FACTOR of transformers' own and its top-1 token is the reference's (waived where transformers'
    own top-1 misses it too: a near tie). In float32 the reference is transformers' forward and the max
    |logit diff| must be under FP32_TOLERANCE.
    """
    model = engine.model
    dtype = model.transformer.dtype
    ids = layout.ids[None].to(model.transformer.device)
    hf = model.hf(input_ids=ids, logits_to_keep=1).logits[0, -1]
    if dtype == torch.float32:
        ref = hf
    else:
        with upcast_parameters(model.hf):
            ref = model.hf(input_ids=ids, logits_to_keep=1).logits[0, -1]
    ours = {"full": engine.prefill(layout, make_selector("fullcomp"), 1)[0].logits,
            "fused": engine.prefill(layout, make_selector("qcfuse", 1.0), 1)[0].logits}
    out = {"dtype": str(dtype).replace("torch.", ""), "tokens": layout.n_tokens,
           "reference": "transformers forward" if dtype == torch.float32 else "float32 forward of the same weights",
           "transformers": _errors(hf, ref), "ref_top1": int(ref.float().argmax())}
    for name, logits in ours.items():
        e = _errors(logits, ref)
        if dtype == torch.float32:
            e["passed"] = e["max_abs"] <= FP32_TOLERANCE
        else:
            top1_ok = e["top1"] == out["ref_top1"] or out["transformers"]["top1"] != out["ref_top1"]
            e["passed"] = top1_ok and e["rel_err"] <= LOW_PRECISION_FACTOR * out["transformers"]["rel_err"]
        out[name] = e
    out["passed"] = all(out[name]["passed"] for name in ours)
    return out


def format_precision(check: dict) -> str:
    t = check["transformers"]
    head = (f"check at {check['tokens']} tokens ({check['dtype']}, against the {check['reference']}): ")
    if check["dtype"] == "float32":
        return head + (f"max |logit diff| qcfuse full {check['full']['max_abs']:.2e}, fused with every token "
                       f"recomputed {check['fused']['max_abs']:.2e} (tol {FP32_TOLERANCE:.0e}): "
                       f"{'PASS' if check['passed'] else 'FAIL'}")
    return head + (f"relative error transformers {t['rel_err']:.2e}, qcfuse full {check['full']['rel_err']:.2e}, "
                   f"fused with every token recomputed {check['fused']['rel_err']:.2e} (must be <= "
                   f"{LOW_PRECISION_FACTOR}x transformers'); top-1 ref {check['ref_top1']}, transformers {t['top1']}, "
                   f"full {check['full']['top1']}, fused {check['fused']['top1']}: "
                   f"{'PASS' if check['passed'] else 'FAIL'}")
