"""Low-precision exactness that means something: in bfloat16, qcfuse's first-token logits (full prefill, and
fusion with every token recomputed) are judged against a float32 forward of the same weights, beside
transformers' own bfloat16 forward. qcfuse's error must be within 1.5x of transformers' own, with the same
top-1 token; a real precision bug must fail the check."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from qcfuse.bench.run import _FixedIdsTokenizer, random_layout
from qcfuse.check import LOW_PRECISION_FACTOR, precision_check, upcast_parameters
from qcfuse.engine import FusionEngine
from qcfuse.model.loader import LoadedModel
from qcfuse.model.rope import Rope
from qcfuse.model.transformer import Transformer

VOCAB = 512


def _tiny_bf16(family: str, seed: int = 0) -> LoadedModel:
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                        initializer_range=0.05)
    config._attn_implementation = "sdpa"
    hf = model_cls._from_config(config, dtype=torch.bfloat16).eval()      # as the benchmark builds it
    return LoadedModel(f"tiny-{family}", Transformer(hf), _FixedIdsTokenizer(VOCAB), _fingerprint=f"{family}{seed}")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_error_is_transformers_own(family):
    model = _tiny_bf16(family)
    check = precision_check(FusionEngine(model), random_layout(400, VOCAB, 64, seed=1))
    assert check["dtype"] == "bfloat16" and check["reference"] == "float32 forward of the same weights"
    hf_err = check["transformers"]["rel_err"]
    assert 1e-4 < hf_err < 0.1                  # bf16 really rounds, and the float32 reference really ran
    for name in ("full", "fused"):
        assert check[name]["rel_err"] <= LOW_PRECISION_FACTOR * hf_err
        assert check[name]["top1"] == check["ref_top1"]
    assert check["passed"]


def test_upcast_restores_every_weight_bit_for_bit():
    model = _tiny_bf16("qwen3")
    before = {name: p.clone() for name, p in model.hf.named_parameters()}
    inv_freq = model.hf.model.rotary_emb.inv_freq.clone()
    assert inv_freq.dtype == torch.float32
    with upcast_parameters(model.hf):
        assert all(p.dtype == torch.float32 for p in model.hf.parameters())
    assert model.hf.model.rotary_emb.inv_freq.dtype == torch.float32        # buffers untouched
    for name, p in model.hf.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name
    assert torch.equal(model.hf.model.rotary_emb.inv_freq, inv_freq)


def test_a_precision_bug_fails_the_check(monkeypatch):
    """RoPE angles computed from bfloat16 positions (a plausible bug: exact up to 256, coarse beyond) must fail."""
    model = _tiny_bf16("llama")
    compute = Rope._compute

    def coarse(self, positions, dtype):
        return compute(self, positions.to(torch.bfloat16).float(), dtype)
    monkeypatch.setattr(Rope, "_compute", coarse)

    def direct(self, positions, dtype, device=None):       # no tables: every angle through the buggy _compute
        if isinstance(positions, range):
            positions = torch.arange(positions.start, positions.stop, device=device)
        return self._compute(positions, dtype)
    monkeypatch.setattr(Rope, "cos_sin", direct)
    check = precision_check(FusionEngine(model), random_layout(400, VOCAB, 64, seed=1))
    assert not check["passed"]
    assert check["full"]["rel_err"] > LOW_PRECISION_FACTOR * check["transformers"]["rel_err"]
