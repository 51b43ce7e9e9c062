"""The fuse loop: reused chunk caches + selective recomputation, layer by layer.

For every layer l:
  1. the reused context K (pre-RoPE) is rotated to its place in this prompt and written with V into the buffer
     (for the few layers that the loader brings in together, when the first of them is due);
  2. the active rows (selected document tokens + the whole suffix) compute fresh K/V, overwrite their rows,
     and attend position-causally over the full fused K/V of the prompt;
  3. a selector that asked to look at layer l may narrow the active document rows.
With every document token active this is exactly full prefill; with none it is plain cache reuse.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache.kv import KVBuffer
from ..errors import QcfuseError
from ..model.attention import RowGroups
from ..model.transformer import Transformer
from ..prompt import PromptLayout
from ..transfer import upload
from .selector import FusionInputs, LayerView, ReusedKV, Selector


@dataclass
class FuseResult:
    buffer: KVBuffer          # the prompt's K/V (after RoPE) for every layer, ready for decoding
    logits: torch.Tensor | None   # [vocab] first-token logits (None when only the context was filled)
    recomputed: torch.Tensor  # document positions recomputed through the last layer
    selection_s: float
    reuse_logits: torch.Tensor | None = None   # [vocab] plain reuse's first-token logits, when asked for


@torch.inference_mode()
def fuse(model: Transformer, layout: PromptLayout, reused: ReusedKV | None, selector: Selector,
         capacity: int, context_only: bool = False, attempt: int = 0, with_reuse: bool = False) -> FuseResult:
    """context_only: fill the context's K/V and stop there (no suffix rows, no logits): for a caller that runs
    the question itself, as vLLM does behind the connector. The context's K/V are the same either way, since
    no context row attends to the suffix. attempt: which pass of a request this is (ratio auto may escalate).
    with_reuse: also plain reuse's first-token logits (ratio auto's reuse check), from a shadow of the suffix
    rows that steps through each layer after the reused K/V are placed and before the fused rows overwrite
    the selected ones (and the shadow's own suffix K/V): what a reuse pass computes, without reading the
    layers twice. The shadow's projections and MLP are batched with the fused rows' (RowGroups)."""
    n, ctx = layout.n_tokens, layout.context_len
    ids = upload(layout.ids, model.device)
    docs = layout.doc_positions()
    buffer = model.new_buffer(capacity)

    if selector.uses_cache:
        t0 = time.perf_counter()
        inputs = FusionInputs(model, layout, reused, attempt)
        selector.stage(inputs)              # the selector's small reads go first on the loader's stream,
        reused.loader.prefetch()            # then the full layers behind them (now from a slow tier, else lazily)
        doc_rows = _checked(selector.select(inputs), layout)
        synchronize(model.device)
        selection_s = time.perf_counter() - t0
        always = layout.suffix_positions()
    else:   # plain prefill: the prefix is computed too and nothing is read
        doc_rows, selection_s = docs, 0.0
        always = torch.cat([torch.arange(len(layout.prefix)), layout.suffix_positions()])
    if context_only:
        always = always[always < ctx]

    rows = torch.cat([doc_rows, always]).sort().values                     # on the host: plans need no sync
    attention = model.plan(rows, n)
    stepped, n_shadow = attention, 0
    if with_reuse and selector.uses_cache and not context_only:
        if selector.refine_layers:
            raise RuntimeError(f"{selector.name}: the reuse check does not combine with refine layers")
        shadow = model.plan(layout.suffix_positions(), n)                   # plain reuse's rows, stepped first
        stepped, n_shadow = RowGroups([shadow, attention]), shadow.n_rows
    h = model.embed(ids[stepped.rows])                                     # [n_shadow + n_rows, E]
    placed = range(0)
    for layer in range(model.n_layers):
        if selector.uses_cache and layer not in placed:                    # the layers that arrived with this one
            placed, k_group, v_group = reused.group(layer)                 # [G, Hkv, ctx, D] pre-RoPE
            model.place_reused(buffer, placed, k_group, v_group)
        h, k_new, v_new = model.layer_step(layer, h, stepped, buffer)

        if selector.uses_cache and layer in selector.refine_layers:
            synchronize(model.device)                                      # time the refinement alone
            t0 = time.perf_counter()
            n_doc = int((rows < ctx).sum())
            doc_idx = attention.rows[:n_doc]
            k_old, v_old = reused.layer(layer)                             # [Hkv, ctx, D] pre-RoPE
            view = LayerView(layer, attention.rows, n_doc, k_new, v_new, k_old[:, doc_idx], v_old[:, doc_idx], h)
            keep = _checked(selector.refine(view), layout)
            if not bool(torch.isin(keep, rows[:n_doc]).all()):
                raise RuntimeError(f"{selector.name}.refine may only narrow the active rows")
            keep_mask = torch.isin(rows, keep) | (rows >= ctx)
            rows, h = rows[keep_mask], h[keep_mask.to(h.device)]
            attention = stepped = model.plan(rows, n)
            synchronize(model.device)
            selection_s += time.perf_counter() - t0

    recomputed = rows[(rows >= len(layout.prefix)) & (rows < ctx)]
    logits = None if context_only else model.logits(h[-1:])[0]
    reuse_logits = model.logits(h[n_shadow - 1:n_shadow])[0] if n_shadow else None
    return FuseResult(buffer, logits, recomputed.cpu(), selection_s, reuse_logits)


def synchronize(device: torch.device) -> None:
    """Wait for the compute stream's queued work, so wall-clock timings mean what they say (no-op on the CPU).
    The compute stream only: a device-wide sync would also wait for every layer the loader has queued, which
    the request does not need yet (and would charge that transfer to whatever is being timed)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _checked(positions: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
    if positions.numel():
        if positions.unique().numel() != positions.numel():
            raise RuntimeError("a selector returned duplicate positions")
        lo, hi = len(layout.prefix), layout.context_len
        if int(positions.min()) < lo or int(positions.max()) >= hi:
            raise RuntimeError("a selector returned a position outside the documents")
    return positions.sort().values


@torch.inference_mode()
def decode_step(model: Transformer, buffer: KVBuffer, token: int, position: int) -> torch.Tensor:
    """Feed one token at `position` (its K/V land in the buffer there); the next token's logits [vocab]."""
    if position + 1 > buffer.capacity:
        raise QcfuseError("decoding ran past the allocated cache")
    attention = model.plan(range(position, position + 1), position + 1)
    h = model.embed(torch.tensor([token], device=model.device))
    for layer in range(model.n_layers):
        h, _, _ = model.layer_step(layer, h, attention, buffer)
    return model.logits(h)[0]


@torch.inference_mode()
def greedy_decode(model: Transformer, buffer: KVBuffer, first_logits: torch.Tensor, start: int,
                  max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation from a filled buffer whose first `start` rows hold the prompt."""
    tokens: list[int] = []
    logits = first_logits
    for i in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in stop_ids or i == max_new_tokens - 1:
            break
        logits = decode_step(model, buffer, token, start + i)
    return tokens
