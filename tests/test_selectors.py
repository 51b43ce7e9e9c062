"""Selectors: budgets, candidates, and the interface contract enforced by the fuse loop."""
import pytest
import torch

from qcfuse.errors import QcfuseError
from qcfuse.fusion import SELECTORS, FusionInputs, ReusedKV, Selector, make_selector
from qcfuse.fusion.fuse import fuse
from qcfuse.prompt import PromptLayout

DOCS = ["Owls hunt at night and can turn their heads far around.",
        "Otters hold hands while sleeping so they do not drift apart. They eat sea urchins.",
        "The capital of Mongolia is Ulaanbaatar, the coldest capital city in the world."]


def test_registry_and_unknown_method():
    assert {"fullcomp", "reuse", "cacheblend", "epic"} <= set(SELECTORS)
    with pytest.raises(QcfuseError):
        make_selector("nope")
    for bad in (-0.1, 1.5):
        with pytest.raises(QcfuseError):
            make_selector("reuse", bad)


@pytest.mark.parametrize("method", ["cacheblend", "epic", "prophetkv", "fuserag", "qcfuse"])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.15, 0.3, 0.77, 1.0])
def test_budget_is_exact_and_only_document_tokens(smollm2_engine, method, ratio):
    layout = smollm2_engine.layout(DOCS, "Which city is coldest?")
    gen = smollm2_engine.generate_layout(layout, make_selector(method, ratio), max_new_tokens=1)
    assert gen.stats["recomputed_tokens"] == round(ratio * layout.n_doc_tokens)
    assert gen.stats["context_tokens"] == layout.n_doc_tokens


def test_epic_takes_chunk_heads_after_the_first(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(DOCS, "q?")
    picked = make_selector("epic", 0.1).select(FusionInputs(smollm2.transformer, layout, None))
    spans = layout.chunk_spans()
    assert picked.numel() == round(0.1 * layout.n_doc_tokens)
    assert not ((picked >= spans[0][0]) & (picked < spans[0][1])).any()
    for s, e in spans[1:]:
        inside = picked[(picked >= s) & (picked < e)]
        assert inside.tolist() == list(range(s, s + inside.numel()))   # a head, not scattered tokens


class _Rogue(Selector):
    name = "rogue"

    def select(self, inputs):
        return torch.tensor([inputs.layout.context_len])   # a suffix position: not a candidate


def test_fuse_loop_rejects_non_document_positions(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(DOCS, "q?")
    pieces = [smollm2_engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    with pytest.raises(RuntimeError, match="outside the documents"):
        fuse(smollm2.transformer, layout, ReusedKV(pieces), _Rogue(0.1), layout.n_tokens + 1)


def test_reuse_reads_every_layer_once(smollm2, smollm2_engine):
    layout = smollm2_engine.layout(DOCS, "q?")
    pieces = [smollm2_engine._entry(ids)[0] for ids in [layout.prefix, *layout.chunks]]
    reused = ReusedKV(pieces)
    fuse(smollm2.transformer, layout, reused, make_selector("reuse"), layout.n_tokens + 1)
    assert reused.layers_read == list(range(smollm2.transformer.n_layers))


def test_empty_prefix_layout_works(smollm2, smollm2_engine):
    base = smollm2_engine.layout(DOCS[:2], "q?")
    layout = PromptLayout(prefix=[], chunks=base.chunks, suffix=base.suffix)
    gen = smollm2_engine.generate_layout(layout, make_selector("cacheblend", 0.5), max_new_tokens=2)
    assert gen.stats["recomputed_tokens"] == round(0.5 * layout.n_doc_tokens)


def test_cacheblend_gradual_filtering(smollm2_engine):
    layout = smollm2_engine.layout(DOCS, "Which city is coldest?")
    selector = make_selector("cacheblend", 0.15, gradual=[0.5, 0.3])
    assert selector.refine_layers == (1, 2, 3)
    gen = smollm2_engine.generate_layout(layout, selector, max_new_tokens=1)
    assert gen.stats["recomputed_tokens"] == round(0.15 * layout.n_doc_tokens)
    for bad in ([0.1], [0.3, 0.5], [1.5]):
        with pytest.raises(QcfuseError):
            make_selector("cacheblend", 0.15, gradual=bad)


@pytest.mark.parametrize("method,ratio", [("fullcomp", 0.0), ("reuse", 0.0), ("cacheblend", 0.3), ("qcfuse", 0.15),
                                          ("qcfuse", 1.0)])
def test_context_only_fills_the_same_context(smollm2_engine, method, ratio):
    """What the vLLM connector asks for: the context's K/V alone, no suffix rows and no logits. The context
    rows never attend to the suffix, so they come out as in a whole prefill."""
    layout = smollm2_engine.layout(DOCS, "Which city is coldest?")
    whole, _ = smollm2_engine.prefill(layout, make_selector(method, ratio), 1)
    alone, stats = smollm2_engine.prefill(layout, make_selector(method, ratio), 1, context_only=True)
    ctx = layout.context_len
    assert alone.logits is None and whole.logits is not None
    assert torch.equal(alone.recomputed, whole.recomputed)
    assert stats["recomputed_tokens"] == whole.recomputed.numel()
    torch.testing.assert_close(alone.buffer.k[:, :, :ctx], whole.buffer.k[:, :, :ctx], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alone.buffer.v[:, :, :ctx], whole.buffer.v[:, :, :ctx], atol=2e-5, rtol=1e-4)
