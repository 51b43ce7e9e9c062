"""Running a few query rows (a question, a probe) through the model over a *given* context, and reading
their attention. Shared by the query-aware selectors and by the offline anchor pass.

The context is supplied per layer as (positions, pre-RoPE keys, values), so a caller can hand in the whole
reused cache (ProphetKV), or a compressed view of it (QCFuse's anchors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.attention import DenseAttention, visible
from ..model.transformer import Transformer
from ..transfer import upload

Context = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]   # layer -> (pos [m], k [Hkv,m,D], v)
OnLayer = Callable[[int, torch.Tensor], None]                                 # (layer, q [H, n, D] after RoPE)


@torch.inference_mode()
def run_probe(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, context: Context,
              n_layers: int, on_layer: OnLayer, rotated: bool = False) -> None:
    """Compute rows `ids` at `positions` through layers 0..n_layers-1, each attending over context(l) and
    causally over themselves; call on_layer(l, q) with the rows' queries at every layer. The context lies
    before the rows (as in every use: documents before the question, a chunk before its probe), so on a layer
    without a window every context key is visible to every row, wherever it sits: one mask serves every such
    layer whose context has the same length. rotated: the context's keys come after RoPE already."""
    h = model.embed(upload(ids, model.device))
    masks: dict[int, DenseAttention] = {}                  # context length -> plan, for window-free layers
    for layer in range(n_layers):
        ctx_pos, ctx_k, ctx_v = context(layer)
        q, k, v = model.project_qkv(layer, h, positions)
        on_layer(layer, q)
        ctx_keys = ctx_k if rotated else model.rope(layer, ctx_k, ctx_pos)
        keys = torch.cat([ctx_keys, model.rope(layer, k, positions)], dim=1)
        values = torch.cat([ctx_v, v], dim=1)
        window_free = model.spec.layers[layer].window is None
        plan = masks.get(ctx_pos.shape[0]) if window_free else None
        if plan is None:
            plan = DenseAttention(positions, torch.cat([ctx_pos, positions]))
            if window_free:
                masks[ctx_pos.shape[0]] = plan
        h = model.attend(layer, h, q, keys, values, plan)


def attention_probs(model: Transformer, layer: int, q: torch.Tensor, q_pos: torch.Tensor,
                    keys: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of queries q [H, n, D] over roped keys [Hkv, m, D]: [H, n, m] in fp32. Each key head
    serves its group of query heads in one matmul, so the keys are not copied once per query head (at 32K
    tokens that copy was the largest tensor of a selection). key_valid [m]: False hides a (filler) key."""
    n_kv, n_keys = keys.shape[0], keys.shape[1]
    grouped = q.float().reshape(n_kv, -1, q.shape[-1])                   # [Hkv, group*n, D]
    scores = (grouped @ keys.float().transpose(1, 2)).view(q.shape[0], q.shape[1], n_keys)
    scores = scores * model.spec.layers[layer].scaling
    seen = visible(q_pos, k_pos, model.spec.layers[layer].window)
    if key_valid is not None:
        seen &= key_valid[None]
    scores.masked_fill_(~seen[None], float("-inf"))
    return scores.softmax(dim=-1)


def top_positions(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The k positions with the highest scores, sorted, on the host (the selection's one wait for the GPU)."""
    k = min(k, scores.numel())
    return positions[scores.float().topk(k).indices.cpu()].sort().values


QUERY_ROWS = ("suffix", "question", "last", "suffix+last")   # which suffix rows' attention scores the documents


@dataclass
class PaddedRows:
    """A question pass's suffix and context padded to bucket sizes (fusion/graphs.py), on the device: a graph
    captured for one padded shape then replays for every prompt that pads to it. Filler rows come after the
    suffix (causal: no real row sees them) and score nothing; filler keys are hidden."""
    ids: torch.Tensor          # [S_b] the suffix's ids, then filler
    positions: torch.Tensor    # [S_b] C, C+1, ...
    weight: torch.Tensor       # [S_b] 1 for a row whose attention scores the documents (query_rows), else 0
    last: torch.Tensor         # [S_b] 1 at the suffix's last row
    key_valid: torch.Tensor    # [C_b] True for the context's C tokens


def padded_rows(layout, query_rows: str, n_rows: int, n_keys: int, device) -> PaddedRows:
    """layout's suffix padded to n_rows rows and its context to n_keys keys."""
    n, ctx = len(layout.suffix), layout.context_len
    if n_rows < n or n_keys < ctx:
        raise ValueError("padding cannot shrink the suffix or the context")
    weight, last = torch.zeros(n_rows), torch.zeros(n_rows)
    last[n - 1] = 1.0
    start, end = layout.question
    if query_rows == "last":
        weight[n - 1] = 1.0
    elif query_rows == "question" and end > start:
        weight[start:end] = 1.0
    else:
        weight[:n] = 1.0
    ints = torch.stack([torch.tensor(layout.suffix + [0] * (n_rows - n)), torch.arange(ctx, ctx + n_rows)])
    ints, floats = upload(ints, device), upload(torch.stack([weight, last]), device)
    return PaddedRows(ints[0], ints[1], floats[0], floats[1], torch.arange(n_keys, device=device) < ctx)


def question_scores(model: Transformer, layout, context: Context, layers: list[int],
                    keys: Callable[[int], torch.Tensor], reduction: str = "mean", head_norm: bool = False,
                    query_rows: str = "suffix", rotated: bool = False,
                    value_norms: Callable[[int], torch.Tensor] | None = None,
                    padded: PaddedRows | None = None) -> torch.Tensor:
    """Score every document token by the attention the suffix (question + answer cue) pays it.

    The suffix runs through layers 0..max(layers) over context(l) (its keys after RoPE when `rotated`); at
    each layer in `layers` its queries attend over keys(l) (pre-RoPE keys of the whole context), the
    probabilities on document tokens are reduced over heads and query tokens (mean or max), normalized to sum
    1, and averaged over `layers`.
    head_norm: each head's (and query row's) attention on the documents is normalized to sum 1 before the
    reduction, so heads that park most of their mass on the prefix weigh as much as document-reading ones.
    query_rows: the whole suffix, only the question's tokens, or only the last row (the one whose output
    becomes the first answer token); "suffix+last" averages the whole suffix's and the last row's scores.
    value_norms: layer -> [Hkv, C] norms of the context's values; each probability is weighted by the norm of
    the value it reads, so a token scores by how much it moves the head's output, not only by its attention.
    padded: the pass over a padded suffix and context (keys(l) then holds C_b keys); of `layout` only the
    prefix's length is read, so a captured pass serves every prompt of its padded shape. Scores come back for
    C_b - prefix tokens, the filler's 0.
    Returns scores [n_doc_tokens] in document-position order, on the compute device (nothing here waits for
    the GPU: the caller's top-k reads the result once).
    """
    doc0 = len(layout.prefix)
    if padded is None:
        ctx = layout.context_len
        ids, q_pos = torch.tensor(layout.suffix), upload(layout.suffix_positions(), model.device)
        last = slice(len(layout.suffix) - 1, None)
        rows = {"suffix": slice(None), "question": slice(*layout.question), "last": last,
                "suffix+last": slice(None)}[query_rows]
        if query_rows == "question" and layout.question[1] <= layout.question[0]:
            rows = slice(None)
    else:                                   # every row computed; the weights say which ones score
        ctx, ids, q_pos, rows, last = padded.key_valid.shape[0], padded.ids, padded.positions, slice(None), slice(None)
    ctx_pos = torch.arange(ctx, device=model.device)
    wanted = set(layers)
    total = torch.zeros(ctx - doc0, device=model.device)

    def reduced(probs: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Over heads and query rows (those of nonzero weight, when weighted), normalized to sum 1."""
        if weight is None:
            s = probs.amax(dim=(0, 1)) if reduction == "max" else probs.mean(dim=(0, 1))
        else:
            probs = probs * weight[None, :, None]
            s = probs.amax(dim=(0, 1)) if reduction == "max" else probs.sum(dim=(0, 1))
        return s / s.sum().clamp_min(1e-30)

    def on_layer(layer: int, q: torch.Tensor) -> None:
        if layer in wanted:
            keys_roped = model.rope(layer, keys(layer), ctx_pos)
            probs = attention_probs(model, layer, q, q_pos, keys_roped, ctx_pos,
                                    None if padded is None else padded.key_valid)[:, rows, doc0:]
            if value_norms is not None:
                group = model.n_heads // model.n_kv_heads
                probs = probs * value_norms(layer)[:, None, doc0:].repeat_interleave(group, dim=0)
            if head_norm:
                probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            s = reduced(probs, None if padded is None else padded.weight)
            if query_rows == "suffix+last":
                s = (s + reduced(probs[:, last], None if padded is None else padded.last)) / 2
            total.add_(s)

    run_probe(model, ids, q_pos, context, max(layers) + 1, on_layer, rotated)
    return total / len(wanted)
