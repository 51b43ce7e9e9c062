"""QCFuse (arXiv 2606.05875): query-aware selection on a compressed view, inside the layer pipeline.

Offline, each chunk gets an anchor ranking per layer: its first 4 ("sink") tokens, then the tokens that a
fixed repeat-the-passage probe appended after the chunk attends to most (max over heads and probe tokens).
Online, the question runs over the prefix + each chunk's top anchors (~10%) through layers 0..max(C) only,
and scores every document token by its attention against the *full* keys of the critical layers C.
So selection needs the small anchor view plus the keys of |C| layers (~10% + |C|/2L of the cache), not all of it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import QcfuseError
from . import graphs
from .cacheblend import most_deviating
from .probe import QUERY_ROWS, PaddedRows, attention_probs, padded_rows, question_scores, run_probe
from .selector import LayerView, Selector, register

PROBE_TEXT = "\n\nRepeat the passage above, word for word."
N_SINKS = 4
N_CRITICAL = 3                 # the paper's number of critical layers: used for a model without a profile
STORED_ANCHOR_RATIO = 0.10     # anchors kept in the query cache; a larger online anchor_ratio reads full layers
FILLER_POSITION = 1 << 30      # a padded anchor's position: after every row, so no row sees it


@register
class QCFuse(Selector):
    name = "qcfuse"
    query_aware = True

    def __init__(self, ratio: float = 0.15, critical_layers: list[int] | None = None, n_critical: int | None = None,
                 reduction: str = "mean", anchor_ratio: float = 0.10, smooth: int = 0, chunk_heads: int = 0,
                 head_norm: bool = False, query_rows: str = "suffix", narrow: float = 1.0, check_layer: int = 1,
                 value_weight: bool = False):
        super().__init__(ratio)
        if reduction not in ("mean", "max"):
            raise QcfuseError("reduction must be 'mean' or 'max'")
        if not 0.0 < anchor_ratio <= 1.0:
            raise QcfuseError("anchor_ratio must be within (0, 1]")
        if int(smooth) < 0 or int(chunk_heads) < 0:
            raise QcfuseError("smooth and chunk_heads must be at least 0")
        if self.auto is not None and int(chunk_heads):
            raise QcfuseError("chunk_heads forces tokens in regardless of score: it does not combine with ratio auto")
        # smooth: a token also scores as its best neighbour within this many tokens (same chunk), so the
        # budget goes to whole spans around what the question attends to; chunk_heads: each chunk's first
        # tokens (where a chunk prefilled alone is most wrong) are taken first, inside the budget
        self.smooth, self.chunk_heads = int(smooth), int(chunk_heads)
        if query_rows not in QUERY_ROWS:
            raise QcfuseError(f"query_rows must be one of: {', '.join(QUERY_ROWS)}")
        if head_norm not in (True, False):               # 1/0 pass too
            raise QcfuseError(f"head_norm must be true or false, got {head_norm!r}")
        self.head_norm, self.query_rows = bool(head_norm), query_rows
        if value_weight not in (True, False):
            raise QcfuseError(f"value_weight must be true or false, got {value_weight!r}")
        self.value_weight = bool(value_weight)      # study option: reads the critical layers' values in full
        # narrow > 1: take narrow x the budget by the question's scores, then keep the budget among them by
        # K/V deviation at check_layer (a query-agnostic second opinion, as CacheBlend's, on few candidates)
        self.narrow, self.check_layer = float(narrow), int(check_layer)
        if self.narrow < 1.0:
            raise QcfuseError("narrow must be at least 1")
        if self.narrow > 1.0:
            if self.auto is not None:
                raise QcfuseError("narrow does not combine with ratio auto")
            self.refine_layers = (self.check_layer,)
        if n_critical is not None and int(n_critical) < 1:
            raise QcfuseError("n_critical must be at least 1")
        # n_critical None: every layer of the model's profile, which are the layers the query cache keeps keys of
        self.critical_layers, self.n_critical = critical_layers, None if n_critical is None else int(n_critical)
        self.reduction, self.anchor_ratio = reduction, float(anchor_ratio)

    def layers_for(self, model) -> list[int]:
        layers = self.critical_layers or default_critical_layers(model, self.n_critical)
        if any(not 0 <= layer < model.n_layers for layer in layers):
            raise QcfuseError(f"critical layers {layers} outside 0..{model.n_layers - 1}")
        return sorted(layers)

    def scoring(self, model) -> dict:
        return {"critical_layers": self.layers_for(model), "reduction": self.reduction,
                "anchor_ratio": self.anchor_ratio, "head_norm": self.head_norm, "query_rows": self.query_rows,
                "smooth": self.smooth, "value_weight": self.value_weight}

    def stage(self, inputs):
        """The query cache (anchors of layers 0..max(C), keys of C) goes to the device ahead of the full layers."""
        if self.refine_layers and not 0 <= self.check_layer < inputs.model.n_layers:
            raise QcfuseError(f"check layer {self.check_layer} outside 0..{inputs.model.n_layers - 1}")
        layers = self.layers_for(inputs.model)
        inputs.reused.stage_query(max(layers) + 1, self.anchor_ratio, layers)

    def scores(self, inputs):
        model, layout, reused = inputs.model, inputs.layout, inputs.reused
        self.stage(inputs)                                  # no-op when the fuse loop staged it already
        layers = self.layers_for(model)
        pos, k, v = reused.anchors_upto(max(layers) + 1, self.anchor_ratio)
        k = model.rope_stacked(k, pos)            # every layer's anchors rotated at once, not one layer at a time
        if self.value_weight:                     # study option: reads full layers, so never a graph
            value_norms = lambda layer: reused.layer(layer)[1].float().norm(dim=-1)    # noqa: E731
            scores = question_scores(model, layout, lambda layer: (pos[layer], k[layer], v[layer]), layers,
                                     reused.keys, self.reduction, self.head_norm, self.query_rows, rotated=True,
                                     value_norms=value_norms)
        else:
            scores = question_pass(model, layout, layers, pos, k, v, {layer: reused.keys(layer) for layer in layers},
                                   self.reduction, self.head_norm, self.query_rows)
        if self.smooth or self.chunk_heads:
            scores = scores.clone()
            doc0 = len(layout.prefix)
            for start, end in layout.chunk_spans():
                a, b = start - doc0, end - doc0
                if self.smooth:
                    scores[a:b] = torch.nn.functional.max_pool1d(scores[None, None, a:b], 2 * self.smooth + 1,
                                                                 stride=1, padding=self.smooth)[0, 0]
                scores[a:a + self.chunk_heads] = float("inf")
        return scores

    def budget(self, layout) -> int:
        self._final = super().budget(layout)
        return min(layout.n_doc_tokens, int(round(self.narrow * self._final)))

    def refine(self, view: LayerView) -> torch.Tensor:
        return most_deviating(view, self._final)

    @classmethod
    def offline(cls, model, ids: list[int], entry) -> None:
        """Rank each chunk token per layer by the attention of a repeat-the-passage probe appended after it."""
        t = model.transformer
        probe = torch.tensor(model.tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids)
        n = len(ids)
        ctx_pos = torch.arange(n, device=t.device)
        probe_pos = torch.arange(n, n + len(probe), device=t.device)
        scores = torch.zeros(t.n_layers, n)

        def on_layer(layer: int, q: torch.Tensor) -> None:
            probs = attention_probs(t, layer, q, probe_pos, t.rope(layer, entry.k[layer], ctx_pos), ctx_pos)
            scores[layer] = probs.amax(dim=(0, 1)).cpu()

        run_probe(t, probe, probe_pos, lambda layer: (ctx_pos, entry.k[layer], entry.v[layer]), t.n_layers,
                  on_layer)
        scores[:, : min(N_SINKS, n)] = float("inf")                  # sinks first, inside the budget
        rank = scores.argsort(dim=1, descending=True)
        # the query cache, read before anything else online: anchors (~10%) + keys of the critical layers
        m = math.ceil(STORED_ANCHOR_RATIO * n)
        top = rank[:, :m].to(entry.k.device)                          # [L, m] in rank order
        gather = top[:, None, :, None].expand(-1, entry.k.shape[1], -1, entry.k.shape[3])
        critical = default_critical_layers(t)                        # every profiled layer
        entry.extras["anchor_rank"] = rank.to(torch.int32)
        entry.extras["anchor_pos"] = top.to(torch.int32).contiguous()   # [L, m]: positions of anchor_k/v
        entry.extras["anchor_k"] = entry.k.gather(2, gather)           # [L, Hkv, m, D]
        entry.extras["anchor_v"] = entry.v.gather(2, gather)
        entry.extras["critical_layers"] = torch.tensor(critical, dtype=torch.int32)
        entry.extras["critical_k"] = entry.k[critical].clone()         # [|C|, Hkv, n, D]


def question_pass(model, layout, layers: list[int], pos, k, v, critical: dict, reduction: str, head_norm: bool,
                  query_rows: str) -> torch.Tensor:
    """question_scores over the staged query cache: anchors (positions [A, m], keys after RoPE [A, Hkv, m, D],
    values) and the critical layers' pre-RoPE keys {layer: [Hkv, C, D]}.

    Where graphs run (fusion/graphs.py), the pass is padded to bucket sizes (suffix, anchors and context each
    rounded up by at most 12.5%) and replays as a CUDA graph once its padded shape repeats, so prompts that
    differ by a few tokens share one graph. It reads nothing but these tensors, so its key is the options and
    the prefix's length (the shapes are added by the cache). Elsewhere it runs unpadded, as it always did."""
    def context(pos, k, v):
        return lambda layer: (pos[layer], k[layer], v[layer])
    if not graphs.enabled(k.device):
        return question_scores(model, layout, context(pos, k, v), layers, critical.__getitem__, reduction, head_norm,
                               query_rows, rotated=True)
    n_ctx, n_rows, n_anchors = layout.context_len, len(layout.suffix), k.shape[2]
    ctx_b, rows_b = graphs.bucket(n_ctx, 256), graphs.bucket(n_rows, 16)
    if max(ctx_b, n_ctx + rows_b) > model.max_positions:      # filler would run past RoPE's table
        ctx_b, rows_b = n_ctx, n_rows
    extra = graphs.bucket(n_anchors, 64) - n_anchors
    padded = padded_rows(layout, query_rows, rows_b, ctx_b, k.device)
    inputs = {"pos": _longer(pos, extra, FILLER_POSITION), "k": _longer(k, extra), "v": _longer(v, extra),
              "ids": padded.ids, "positions": padded.positions, "weight": padded.weight, "last": padded.last,
              "key_valid": padded.key_valid}
    inputs |= {f"keys{layer}": _longer(keys, ctx_b - n_ctx) for layer, keys in critical.items()}
    key = ("qcfuse question pass", tuple(layers), len(layout.prefix), reduction, bool(head_norm), query_rows)

    def run(pos, k, v, ids, positions, weight, last, key_valid, **keys) -> torch.Tensor:
        return question_scores(model, layout, context(pos, k, v), layers, lambda layer: keys[f"keys{layer}"],
                               reduction, head_norm, query_rows, rotated=True,
                               padded=PaddedRows(ids, positions, weight, last, key_valid))
    return graphs.replayed(model, key, run, inputs)[:layout.n_doc_tokens]


def _longer(t: torch.Tensor, extra: int, value: int = 0) -> torch.Tensor:
    """t with `extra` filler tokens appended: along the last dim of positions [A, m], the token dim of keys and
    values [.., n, D]. t itself when there is nothing to add (F.pad would copy the query cache for nothing)."""
    if not extra:
        return t
    return F.pad(t, (0, extra) if t.dim() == 2 else (0, 0, 0, extra), value=value)


def default_critical_layers(model, n_critical: int | None = None) -> list[int]:
    """The model's profiled critical layers (the first `n_critical` of them, all by default), or, without a
    profile, N_CRITICAL layers spread over the middle."""
    layers = (getattr(model, "critical_layers", None) or [])[:n_critical]
    if not layers:
        n = model.n_layers
        layers = sorted({max(0, min(n - 1, round(n * f))) for f in (0.25, 0.4, 0.55)})[:n_critical or N_CRITICAL]
    return sorted(layers)
