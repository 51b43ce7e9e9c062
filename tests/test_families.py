"""The engine is exact, family by family, against the transformers reference forward.

Tiny random-weight models (no downloads) of every supported family, built straight from transformers configs.
The weights are made "non-trivial" on purpose: norm weights are moved away from their init value and biases
away from zero, so a missing or wrong norm, bias, scale or RoPE variant shows up in the logits.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from qcfuse.cache.kv import ChunkKV
from qcfuse.engine import FusionEngine
from qcfuse.fusion import ReusedKV, make_selector
from qcfuse.fusion.fuse import fuse, greedy_decode
from qcfuse.model.loader import LoadedModel
from qcfuse.model.norm import rms_norm
from qcfuse.model.transformer import Transformer
from qcfuse.prompt import PromptLayout

VOCAB = 160
WINDOW = 8            # sliding window, much shorter than the ~40-token prompts below
ATOL = 1e-4           # logits, fp32
KV_TOL = dict(atol=1e-5, rtol=1e-5)   # re-positioned keys/values, fp32

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    initializer_range=0.1,            # large enough that attention is far from uniform
    pad_token_id=0, bos_token_id=1, eos_token_id=None,   # no EOS: generate() runs all its steps
)


# -- tiny-model factories ---------------------------------------------------------------------------------
def _build(config_cls, model_cls, **overrides):
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"          # the plainest reference path
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:          # RMSNorm weights (Gemma stores them as offsets from 1: init 0)
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    return model


def llama():
    return _build(LlamaConfig, LlamaForCausalLM)


def llama_yarn():       # a static RoPE variant whose attention_scaling != 1
    return _build(LlamaConfig, LlamaForCausalLM,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 1024})


def qwen2():            # attention bias on q/k/v
    return _build(Qwen2Config, Qwen2ForCausalLM)


def qwen2_sliding():    # per-layer sliding windows via layer_types
    return _build(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def qwen3():            # q/k norm
    return _build(Qwen3Config, Qwen3ForCausalLM)


def mistral():          # one sliding window for every layer
    return _build(MistralConfig, MistralForCausalLM, sliding_window=WINDOW)


def gemma3():   # scaled embeddings, sandwich norms, q/k norm, local/global layers with their own RoPE, softcap
    return _build(
        Gemma3TextConfig, Gemma3ForCausalLM,
        num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )


FAMILIES = {
    "llama": llama, "llama-yarn": llama_yarn, "qwen2": qwen2, "qwen2-sliding": qwen2_sliding,
    "qwen3": qwen3, "mistral": mistral, "gemma3": gemma3,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest, and does not stall when other work shares the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(hf model, qcfuse Transformer over it), built once per family."""
    hf = FAMILIES[request.param]()
    return hf, Transformer(hf)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()     # never pad/bos


def _layout(n_chunks: int = 3, prefix_len: int = 5) -> PromptLayout:
    lengths = [12, 10, 9][:n_chunks]
    return PromptLayout(prefix=_ids(prefix_len, 1), chunks=[_ids(n, 10 + i) for i, n in enumerate(lengths)],
                        suffix=_ids(6, 2))


def _reused(model: Transformer, layout: PromptLayout) -> ReusedKV:
    """Offline caches as the engine builds them: the prefix and each chunk prefilled alone, at positions 0.."""
    pieces = [layout.prefix, *layout.chunks] if layout.prefix else layout.chunks
    return ReusedKV([ChunkKV(*model.prefill(torch.tensor(ids))[:2]) for ids in pieces])


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids[None]).logits[0].float()


@torch.no_grad()
def _hf_greedy(hf, ids: torch.Tensor, new: int) -> list[int]:
    out = hf.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=False, max_new_tokens=new)
    tokens = out[0, ids.shape[0]:].tolist()
    assert len(tokens) == new                     # no EOS in these configs, so generate() never stops early
    return tokens


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- 1. full prefill ----------------------------------------------------------------------------------------
def test_model_is_what_the_family_should_be(family):
    hf, model = family
    spec = model.spec
    assert spec.qk_norm == (hf.config.model_type in ("qwen3", "gemma3_text"))
    assert spec.sandwich_norm == (hf.config.model_type == "gemma3_text")
    layer_types = getattr(hf.config, "layer_types", None) or ["full_attention"] * model.n_layers
    if hf.config.model_type == "mistral":
        assert all(layer.window == WINDOW for layer in spec.layers)
    else:
        assert [layer.window for layer in spec.layers] == [WINDOW if t == "sliding_attention" else None
                                                           for t in layer_types]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_is_bitwise_transformers(family, dtype):
    """Every RMSNorm module of the family (input, post-attention, q/k, sandwich, final), called by transformers
    and through model/norm.py's fused kernel, on rows of very different scales: equal to the last bit."""
    hf, _ = family
    norms = [(name, m) for name, m in hf.named_modules() if "norm" in type(m).__name__.lower()]
    assert len(norms) >= 2 * hf.config.num_hidden_layers + 1
    g = torch.Generator().manual_seed(7)
    for name, module in norms:
        width = module.weight.shape[0]
        x = torch.randn(9, 3, width, generator=g) * torch.logspace(-3, 3, 9)[:, None, None]
        m = copy.deepcopy(module).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(m, x.to(dtype)), m(x.to(dtype))), name


def test_prefill_matches_hf_forward_at_every_position(family):
    hf, model = family
    ids = torch.tensor(_ids(40, 3))
    _, _, h = model.prefill(ids)
    assert _max_diff(model.logits(h), _hf_logits(hf, ids)) <= ATOL


# -- 2. re-positioning a chunk cache ------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1, 7, 20, 133])
def test_chunk_cache_repositions_exactly(family, offset):
    _, model = family
    ids = torch.tensor(_ids(14, 4))
    k0, v0, _ = model.prefill(ids, start=0)
    kp, vp, _ = model.prefill(ids, start=offset)
    pos = torch.arange(offset, offset + ids.shape[0])
    for layer in range(model.n_layers):
        moved = model.rope(layer, k0[layer], pos)
        torch.testing.assert_close(moved, model.rope(layer, kp[layer], pos), **KV_TOL, msg=f"layer {layer} K")
        torch.testing.assert_close(v0[layer], vp[layer], **KV_TOL, msg=f"layer {layer} V")


# -- 3. fuse loop with everything recomputed == full prefill ------------------------------------------------
@pytest.mark.parametrize("method", ["fullcomp", "cacheblend", "epic"])
def test_fuse_at_full_ratio_equals_full_prefill(family, method):
    hf, model = family
    layout = _layout()
    selector = make_selector(method, 1.0)
    reused = _reused(model, layout) if selector.uses_cache else None
    out = fuse(model, layout, reused, selector, capacity=layout.n_tokens)
    assert _max_diff(out.logits, _hf_logits(hf, layout.ids)[-1]) <= ATOL
    assert out.recomputed.tolist() == layout.doc_positions().tolist()
    # the fused cache (what decoding reads) is the full-prefill cache too
    ref = fuse(model, layout, None, make_selector("fullcomp"), capacity=layout.n_tokens).buffer
    assert _max_diff(out.buffer.k, ref.k) <= ATOL
    assert _max_diff(out.buffer.v, ref.v) <= ATOL


# -- 3b. the fuse loop itself adds no error: with caches that already saw their context, any selection is exact
@pytest.mark.parametrize("method,ratio", [("reuse", 0.0), ("cacheblend", 0.3), ("epic", 0.5)])
def test_fuse_with_in_context_caches_is_exact_at_any_ratio(family, method, ratio):
    # Slicing the full prefill's pre-RoPE K/V into prefix/chunk pieces gives caches that lack nothing, so the
    # loop must reproduce full prefill however few rows it recomputes. This checks what the full-ratio test
    # cannot: reused keys re-rotated to offsets > 0 and mixed with fresh rows under the (sliding) masks.
    hf, model = family
    layout = _layout()
    k, v, _ = model.prefill(layout.ids)
    bounds = [0, len(layout.prefix), *(e for _, e in layout.chunk_spans())]
    reused = ReusedKV([ChunkKV(k[:, :, s:e], v[:, :, s:e]) for s, e in zip(bounds, bounds[1:])])
    out = fuse(model, layout, reused, make_selector(method, ratio), capacity=layout.n_tokens)
    assert 0 < layout.n_doc_tokens - out.recomputed.numel()          # some document rows really are reused
    assert _max_diff(out.logits, _hf_logits(hf, layout.ids)[-1]) <= ATOL


# -- 4. one chunk at the start of the prompt: plain reuse is already exact ----------------------------------
def test_single_chunk_reuse_equals_full_prefill(family):
    # Exact only if nothing precedes the chunk: its cache was computed alone at positions 0.., so any prefix
    # would be missing from it. Hence prefix=[] (the engine's prefix cache is then simply absent).
    hf, model = family
    layout = _layout(n_chunks=1, prefix_len=0)
    out = fuse(model, layout, _reused(model, layout), make_selector("reuse"), capacity=layout.n_tokens)
    assert out.recomputed.numel() == 0
    assert _max_diff(out.logits, _hf_logits(hf, layout.ids)[-1]) <= ATOL
    ref = fuse(model, layout, None, make_selector("fullcomp"), capacity=layout.n_tokens).buffer
    assert _max_diff(out.buffer.k, ref.k) <= ATOL
    assert _max_diff(out.buffer.v, ref.v) <= ATOL


class _StubTokenizer:
    """Just what FusionEngine needs around token ids: a vocabulary to fingerprint, no EOS, a decode, and an
    encoder for the fixed probe text QCFuse appends offline (one id per character)."""
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) % VOCAB for c in text])

    def get_vocab(self):
        return {str(i): i for i in range(VOCAB)}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_engine_with_empty_prefix_reuses_one_chunk_exactly(family):
    # The same through FusionEngine: an empty prefix must simply have no cache entry (it is never prefilled).
    hf, model = family
    engine = FusionEngine(LoadedModel("tiny", model, _StubTokenizer()))
    layout, new = _layout(n_chunks=1, prefix_len=0), 8
    first = engine.generate_layout(layout, make_selector("reuse"), max_new_tokens=new)
    again = engine.generate_layout(layout, make_selector("reuse"), max_new_tokens=new)
    assert (first.stats["cache_misses"], again.stats["cache_hits"]) == (1, 1)
    assert _max_diff(first.first_logits, _hf_logits(hf, layout.ids)[-1]) <= ATOL
    assert first.token_ids == again.token_ids == _hf_greedy(hf, layout.ids, new)


# -- 5. two chunks: plain reuse loses the cross-chunk attention ---------------------------------------------
def test_two_chunk_reuse_differs_from_full_prefill(family):
    hf, model = family
    layout = _layout(n_chunks=2)
    out = fuse(model, layout, _reused(model, layout), make_selector("reuse"), capacity=layout.n_tokens)
    assert _max_diff(out.logits, _hf_logits(hf, layout.ids)[-1]) > 1e-3


# -- 6. greedy decoding from the fused cache ----------------------------------------------------------------
def test_greedy_decode_matches_hf_generate(family):
    hf, model = family
    layout, new = _layout(), 8
    out = fuse(model, layout, None, make_selector("fullcomp"), capacity=layout.n_tokens + new)
    tokens = greedy_decode(model, out.buffer, out.logits, layout.n_tokens, new, stop_ids=set())
    assert tokens == _hf_greedy(hf, layout.ids, new)
