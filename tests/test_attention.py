"""The attention seam (qcfuse/model/attention.py): every kernel computes the reference attention, position-causal
and windowed, for every shape of rows the engine produces; the plan reads nothing back from the device; and the
FlexAttention block mask's tiles are exactly those the row-level mask needs (eager FlexAttention on the CPU
ignores block sparsity, so the tiles are checked on their own)."""
from __future__ import annotations

import pytest
import torch

from qcfuse.model import attention as att
from qcfuse.model.attention import RowAttention, tile_visibility, visible

H, HKV, D = 4, 2, 16


def _reference(q, keys, values, q_pos, k_pos, window, scale):
    """Plain fp64 softmax attention with the row-level mask: [H, n, D]."""
    group = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, 0)
    v = values.double().repeat_interleave(group, 0)
    s = q.double() @ k.transpose(1, 2) * scale
    s = s.masked_fill(~visible(q_pos, k_pos, window)[None], float("-inf"))
    return s.softmax(-1) @ v


def _rows(kind: str, n_keys: int, g: torch.Generator) -> torch.Tensor:
    if kind == "all":                          # full prefill: the rows are the keys
        return torch.arange(n_keys)
    if kind == "last":                         # decoding: one row after every key
        return torch.tensor([n_keys - 1])
    if kind == "scattered":                    # a selector's rows plus the question suffix
        picked = torch.randperm(n_keys - 20, generator=g)[: n_keys // 4].sort().values
        return torch.cat([picked, torch.arange(n_keys - 20, n_keys)])
    if kind == "heads":                        # EPIC-like: the first tokens of every chunk
        return torch.cat([torch.arange(s, s + 9) for s in range(0, n_keys - 9, 64)])
    raise ValueError(kind)


@pytest.mark.parametrize("kernel", ["blocked", "flex"])
@pytest.mark.parametrize("kind", ["all", "last", "scattered", "heads"])
@pytest.mark.parametrize("window", [None, 37, 1000])
@pytest.mark.parametrize("key_start", [0, 5])
def test_every_kernel_matches_reference_attention(kernel, kind, window, key_start):
    g = torch.Generator().manual_seed(hash((kernel, kind, window, key_start)) % 1000)
    n_keys = 333                              # several 128-row blocks and tiles, none of them full
    rel = _rows(kind, n_keys, g)
    plan = RowAttention(rel + key_start, n_keys, torch.device("cpu"), torch.float32, key_start, kernel)
    q = torch.randn(H, rel.numel(), D, generator=g)
    keys, values = torch.randn(HKV, n_keys, D, generator=g), torch.randn(HKV, n_keys, D, generator=g)
    out = plan(window, q, keys, values, 0.3)
    ref = _reference(q, keys, values, rel, torch.arange(n_keys), window, 0.3)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, atol=2e-5), (out.double() - ref).abs().max()


def test_kernel_choice_by_shape():
    cpu = torch.device("cpu")
    kinds = {}
    for name, rows, n_keys, window in [("prefill", range(0, 300), 300, None),
                                       ("prefill, window in reach", range(0, 300), 300, 64),
                                       ("prefill, window out of reach", range(0, 300), 300, 4096),
                                       ("decode", range(299, 300), 300, None),
                                       ("decode, window in reach", range(299, 300), 300, 64),
                                       ("scattered", [3, 50, 299], 300, None)]:
        plan = RowAttention(rows, n_keys, cpu, torch.float32, kernel="flex")
        kinds[name] = type(plan.kernel_for(window)).__name__
    assert kinds == {"prefill": "_Causal", "prefill, window in reach": "_Flex",
                     "prefill, window out of reach": "_Causal", "decode": "_AllKeys",
                     "decode, window in reach": "_Flex", "scattered": "_Flex"}


def test_default_kernel_is_flex_only_on_cuda(monkeypatch):
    monkeypatch.delenv("QCFUSE_ATTENTION", raising=False)
    assert att.default_kernel(torch.device("cpu")) == "blocked"
    monkeypatch.setenv("QCFUSE_ATTENTION", "flex")
    assert att.default_kernel(torch.device("cpu")) == "flex"


@pytest.mark.parametrize("window", [None, 1, 100, 300])
@pytest.mark.parametrize("seed", range(4))
def test_flex_tiles_are_exactly_what_the_rows_need(window, seed):
    """Per (row tile, key tile): 'full' only where every row sees every key (the kernel skips the mask there),
    'partial' where some but not all pairs are visible, neither where no pair is visible."""
    g = torch.Generator().manual_seed(seed)
    n_keys = 1000 + seed * 77
    rows = torch.randperm(n_keys, generator=g)[: 150 + 100 * seed].sort().values
    partial, full = tile_visibility(rows, n_keys, window, 128)
    seen = visible(rows, torch.arange(n_keys), window)
    for i in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            tile = seen[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert bool(full[i, j]) == bool(tile.all()), (i, j)
            assert bool(partial[i, j]) == bool(tile.any() and not tile.all()), (i, j)


def test_blocked_kernel_trims_keys_on_both_sides():
    """Each block reads only the keys some of its rows can see: causally above, by the window below."""
    rows = torch.arange(1000, 1300)
    plan = RowAttention(rows, 1300, torch.device("cpu"), torch.float32, kernel="blocked")
    blocks = plan.kernel_for(200).blocks
    assert [(a, b) for a, b, _, _ in blocks] == [(0, 128), (128, 256), (256, 300)]
    assert [(lo, hi) for _, _, lo, hi in blocks] == [(801, 1128), (929, 1256), (1057, 1300)]


def test_plans_never_read_positions_back_from_the_device(monkeypatch):
    """Everything derived from the rows is computed from the host copy: a plan on a fake device works with
    device tensors whose values cannot be read (the loop would have to sync to read them on a GPU)."""
    def no_reads(self, *a, **k):
        raise AssertionError("a device tensor was read on the host")
    plan = RowAttention(torch.tensor([1, 2, 40, 41, 299]), 300, torch.device("cpu"), torch.float32,
                        kernel="blocked")
    monkeypatch.setattr(torch.Tensor, "item", no_reads)
    monkeypatch.setattr(torch.Tensor, "tolist", no_reads)
    q, k = torch.randn(H, 5, D), torch.randn(HKV, 300, D)
    for window in (None, 16):
        plan(window, q, k, k, 0.25)


def test_flex_failure_falls_back_to_blocks(monkeypatch, caplog):
    """If FlexAttention cannot run (e.g. no compiler for the GPU), the request still computes the right thing."""
    rows = torch.tensor([0, 3, 90, 91, 150])
    plan = RowAttention(rows, 151, torch.device("cpu"), torch.float32, kernel="flex")
    monkeypatch.setattr(att, "flex_kernel", lambda device_type: (_ for _ in ()).throw(RuntimeError("no ptxas")))
    monkeypatch.setattr(att, "_FLEX_BROKEN", False)
    q, k, v = torch.randn(H, 5, D), torch.randn(HKV, 151, D), torch.randn(HKV, 151, D)
    out = plan(None, q, k, v, 0.25)
    assert plan.kernels == {"None": "blocked"}
    assert "FlexAttention failed" in caplog.text
    assert torch.allclose(out.double(), _reference(q, k, v, rows, torch.arange(151), None, 0.25), atol=2e-5)


def test_compiled_flex_respects_its_block_mask(monkeypatch):
    """Compiled FlexAttention (inductor's CPU kernel, which skips the tiles the block mask leaves out, unlike the
    eager path) through the whole engine equals the row-block kernel, on a model with a sliding-window layer and
    a global one: no needed tile is left out, and padding rows and keys to whole tiles changes nothing. (Whether
    'full' tiles are truly full is checked above, element by element: this kernel masks them anyway.)
    (Static shapes here: inductor's CPU template fails to build dynamic ones with a window, a CPU-only bug; CUDA
    compiles the Triton template with dynamic shapes.)"""
    from torch.nn.attention.flex_attention import flex_attention

    from qcfuse.bench.run import random_layout, random_model
    from qcfuse.engine import FusionEngine
    from qcfuse.fusion import make_selector
    compiled = torch.compile(flex_attention, dynamic=False)
    monkeypatch.setattr(att, "flex_kernel", lambda device_type: compiled)
    monkeypatch.setattr(att, "_FLEX_BROKEN", False)
    config = {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 2048, "use_sliding_window": True, "sliding_window": 100,
              "layer_types": ["sliding_attention", "full_attention"]}
    loaded = random_model("tiny-qwen2", config, "cpu", torch.float32)
    engine = FusionEngine(loaded)
    for n_tokens, method in ((700, "epic"),):
        layout = random_layout(n_tokens, 300, 200, seed=n_tokens)
        loaded.transformer.scattered_kernel = "flex"
        flex, _ = engine.prefill(layout, make_selector(method, 0.3), 1)
        loaded.transformer.scattered_kernel = "blocked"
        blocked, _ = engine.prefill(layout, make_selector(method, 0.3), 1)
        assert not att._FLEX_BROKEN, att.FLEX_ERRORS[-1:]
        assert torch.allclose(flex.logits, blocked.logits, atol=1e-4), (flex.logits - blocked.logits).abs().max()
