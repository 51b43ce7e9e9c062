"""Exactness of the fusion engine on the real default model, against transformers' own forward."""
import torch

from qcfuse.check import (CHECK_DOCUMENTS, CHECK_QUESTION, logit_distance, reference_greedy, reference_logits,
                          reposition_error)
from qcfuse.fusion import make_selector
from qcfuse.prompt import PromptLayout

TOL = 1e-4


def test_recompute_all_equals_full_prefill(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(CHECK_DOCUMENTS, CHECK_QUESTION)
    ref = reference_logits(smollm2, layout)
    hf_tokens = reference_greedy(smollm2, layout, 32)
    for method in ("fullcomp", "cacheblend", "epic"):
        gen = smollm2_engine.generate_layout(layout, make_selector(method, 1.0), max_new_tokens=32)
        assert gen.stats["recomputed_tokens"] == layout.n_doc_tokens
        assert (gen.first_logits - ref).abs().max().item() <= TOL, method
        # no stop token: compare the full 32-token greedy continuation
        stop = set(smollm2.stop_ids)
        n = next((i + 1 for i, t in enumerate(gen.token_ids) if t in stop), 32)
        assert gen.token_ids == hf_tokens[:n], method


def test_cached_path_really_reads_the_cache(smollm2, smollm2_engine):
    """Ratio 1.0 through the loop must come from cache + recompute, not a silent full prefill."""
    docs = ["Zebras have black and white stripes.", "The Nile flows north into the Mediterranean Sea."]
    smollm2_engine.prepare(docs)
    gen = smollm2_engine.generate(docs, "Where does the Nile flow?", method="cacheblend", ratio=1.0,
                                  max_new_tokens=1)
    assert gen.stats["cache_hits"] == 2 and gen.stats["cache_misses"] == 0


def test_repositioning_is_exact(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(CHECK_DOCUMENTS, CHECK_QUESTION)
    # relative error; fp32 RoPE angles themselves lose ~1e-4 relative precision near position 7000
    for offset, tol in ((1, 1e-5), (57, 1e-5), (1000, 3e-5), (7000, 2e-4)):
        assert reposition_error(smollm2, layout.chunks[0], offset) <= tol, offset


def test_one_chunk_reuse_equals_full_prefill(smollm2, smollm2_engine):
    """A single chunk at the start of the prompt loses nothing: no cross-chunk attention exists."""
    base = smollm2_engine.layout(CHECK_DOCUMENTS[:1], CHECK_QUESTION)
    layout = PromptLayout(prefix=[], chunks=[base.prefix + base.chunks[0]], suffix=base.suffix)
    d, gen = logit_distance(smollm2, smollm2_engine, layout, "reuse", 0.0, reference_logits(smollm2, layout))
    assert gen.stats["recomputed_tokens"] == 0
    assert d <= TOL


def test_two_chunks_reuse_differs_and_ratio_helps(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(CHECK_DOCUMENTS[:2], CHECK_QUESTION)
    ref = reference_logits(smollm2, layout)
    dist = {r: logit_distance(smollm2, smollm2_engine, layout, "cacheblend", r, ref)[0]
            for r in (0.0, 0.25, 0.5, 1.0)}
    reuse = logit_distance(smollm2, smollm2_engine, layout, "reuse", 0.0, ref)[0]
    assert reuse > 0.1                      # fusion matters: plain reuse is visibly off
    assert dist[1.0] <= TOL
    assert dist[0.5] < dist[0.0] and dist[0.25] < dist[0.0]
    assert dist[0.5] <= dist[0.25] * 1.1    # monotone-ish


def test_check_command_passes_on_default_model(smollm2):
    from qcfuse.check import run_checks
    results = run_checks(smollm2)
    assert len(results) == 7
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]
