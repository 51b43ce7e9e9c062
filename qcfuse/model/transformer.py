"""One forward path over a transformers decoder's weights that computes only the rows it is given.

A "row" is a token at a known absolute position. Full prefill passes every row; fusion passes the
selected rows and lets them attend over a key/value buffer that already holds the reused rows.
Shapes: n rows, N keys, H query heads, Hkv key/value heads, D head dim, E hidden size.
"""
from __future__ import annotations

import torch

from ..transfer import upload
from .attention import RowAttention, RowGroups
from .families import FamilySpec, describe
from .norm import rms_norm


class Transformer:
    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        cfg = hf_model.config
        self.config = cfg
        self.spec: FamilySpec = describe(hf_model)
        self.inner = hf_model.model
        self.blocks = list(self.inner.layers)
        self.n_layers = len(self.blocks)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = cfg.max_position_embeddings
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]     # logits per position
        self.critical_layers: list[int] | None = None    # QCFuse's profiled layers, when known
        self.auto_calibration: dict | None = None        # ratio auto's calibrated attention shares, when known
        first = next(hf_model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.scattered_kernel: str | None = None       # None: attention.default_kernel(device) decides

    # -- pieces of one layer ------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)                                   # [n] -> [n, E]

    def rope(self, layer: int, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None):
        return self.spec.layers[layer].rope.apply(x, positions, out)         # [h, n, D]

    def rope_stacked(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys of layers 0..A-1 ([A, Hkv, n, D], pre-RoPE) each rotated to its own positions [A, n] by its
        layer's table; layers that share a table (all of them, unless the family alternates) in one go."""
        by_table = self._by_rope_table(range(x.shape[0]))
        if len(by_table) == 1:
            return self.spec.layers[0].rope.apply_stacked(x, positions)
        out = torch.empty_like(x)
        for layers in by_table:
            idx = upload(torch.tensor(layers), x.device)
            out[idx] = self.spec.layers[layers[0]].rope.apply_stacked(x[idx], positions[idx])
        return out

    def _by_rope_table(self, layers) -> list[list[int]]:
        """`layers` grouped by the RoPE table they rotate with: one group, unless the family alternates."""
        groups: dict[int, list[int]] = {}
        for layer in layers:
            groups.setdefault(id(self.spec.layers[layer].rope), []).append(layer)
        return list(groups.values())

    def project_qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """Query (after RoPE), key (before RoPE, after any k-norm) and value for rows h: [n, E]."""
        block = self.blocks[layer]
        attn = block.self_attn
        x = rms_norm(block.input_layernorm, h)
        heads = (-1, self.head_dim)
        q = attn.q_proj(x).unflatten(-1, heads)                            # [n, H, D]
        k = attn.k_proj(x).unflatten(-1, heads)                            # [n, Hkv, D]
        v = attn.v_proj(x).unflatten(-1, heads).transpose(0, 1)            # [Hkv, n, D]
        if self.spec.qk_norm:
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        q = self.rope(layer, q.transpose(0, 1), positions)                 # [H, n, D]
        return q, k.transpose(0, 1), v                                     # k: [Hkv, n, D] pre-RoPE

    def attend(self, layer: int, h, q, keys, values, attention) -> torch.Tensor:
        """Rows' attention over keys/values [Hkv, N, D] (keys after RoPE), then the MLP: returns new h [n, E].
        `attention` (a plan from model/attention.py) knows the rows and picks the kernel."""
        spec = self.spec.layers[layer]
        return self.finish(layer, h, attention(spec.window, q, keys, values, spec.scaling))

    def finish(self, layer: int, h, o) -> torch.Tensor:
        """The rows' attention output o [H, n, D] through o_proj into the residual, then the MLP: new h [n, E]."""
        block = self.blocks[layer]
        o = block.self_attn.o_proj(o.transpose(0, 1).flatten(1))
        if self.spec.sandwich_norm:
            h = h + rms_norm(block.post_attention_layernorm, o)
            mlp_out = block.mlp(rms_norm(block.pre_feedforward_layernorm, h))
            return h + rms_norm(block.post_feedforward_layernorm, mlp_out)
        h = h + o
        return h + block.mlp(rms_norm(block.post_attention_layernorm, h))

    def plan(self, rows, n_keys: int, key_start: int = 0) -> RowAttention:
        """Attention of sorted rows over keys key_start..key_start+n_keys-1, planned once on the host."""
        return RowAttention(rows, n_keys, self.device, self.dtype, key_start, self.scattered_kernel)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.hf.lm_head(rms_norm(self.inner.norm, h)).float()        # [n, vocab]
        cap = self.spec.final_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def layer_step(self, layer: int, h, attention: RowAttention | RowGroups, buffer):
        """Compute the planned rows through one layer against buffer[:n_keys], writing their fresh K/V into it
        first. Returns the rows' new hidden [n, E] and their fresh pre-RoPE key and value [Hkv, n, D].
        A RowGroups plan steps its groups in order (each writes, then attends), with one projection and MLP."""
        spec = self.spec.layers[layer]
        q, k, v = self.project_qkv(layer, h, attention.rows)
        outs, start = [], 0
        for plan in attention.groups:                      # one group, unless rows attend in turns
            part = slice(start, start + plan.n_rows)
            start = part.stop
            q_p, k_p, v_p = (q, k, v) if plan is attention else (q[:, part], k[:, part], v[:, part])
            buffer.write(layer, plan.rows, self.rope(layer, k_p, plan.rows), v_p, plan.span)
            keys, values = buffer.k[layer, :, :plan.n_keys], buffer.v[layer, :, :plan.n_keys]
            outs.append(plan(spec.window, q_p, keys, values, spec.scaling))           # [H, n_p, D]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.finish(layer, h, o), k, v

    def place_reused(self, buffer, layers: range, k_pre: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Write reused pre-RoPE keys [G, Hkv, n, D] and values of consecutive `layers` at positions
        start..start+n-1 into the buffer, rotating the keys straight into place (no temporary copy of the reused
        context); layers that share a RoPE table (all of them, unless the family alternates) in one go."""
        n, span = k_pre.shape[2], range(start, start + k_pre.shape[2])
        if len(self._by_rope_table(layers)) == 1:
            self.rope(layers[0], k_pre, span, out=buffer.k[layers.start:layers.stop, :, start:start + n])
        else:
            for i, layer in enumerate(layers):
                self.rope(layer, k_pre[i], span, out=buffer.k[layer, :, start:start + n])
        buffer.v[layers.start:layers.stop, :, start:start + n].copy_(v)

    def new_buffer(self, capacity: int):
        from ..cache.kv import KVBuffer
        return KVBuffer(self.n_layers, self.n_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    # -- whole passes -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, start: int = 0):
        """Plain causal prefill of ids at positions start..: per-layer pre-RoPE keys, values, and last hidden.

        Returns k, v: [L, Hkv, n, D] and h: [n, E]. This is both the offline chunk prefill (start=0) and the
        full-prefill baseline.
        """
        plan = self.plan(range(start, start + ids.shape[0]), ids.shape[0], key_start=start)
        h = self.embed(ids.to(self.device))
        ks, vs = [], []
        for layer in range(self.n_layers):
            q, k, v = self.project_qkv(layer, h, plan.rows)
            h = self.attend(layer, h, q, self.rope(layer, k, plan.rows), v, plan)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs), h
