"""The Selector interface: which document tokens the fuse loop recomputes.

A selector answers once before layer 0 (`select`), and may narrow its answer after chosen layers
(`refine_layers` / `refine`) using what the loop just computed there: fresh and reused K/V of the active rows.
Selectors that need a probe of the query run it inside `select`, reading layers from `inputs.reused`
(which records what was read, so pipelining claims can be tested). Adding a selector never touches the loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.kv import ChunkKV
from ..cache.loader import LayerLoader
from ..errors import QcfuseError
from ..model.transformer import Transformer
from ..prompt import PromptLayout


class ReusedKV:
    """The reused context (prefix + chunks, pre-RoPE) as one span, read layer by layer.

    `pieces` are chunk caches (ChunkKV) or store-backed sources: anything with n_tokens, n_layers, extras
    (the small query cache, read first) and layer(l). Full layers come through a LayerLoader, which may read
    ahead in the background. Three kinds of read, each logged in `reads` as (kind, layer) so pipelining
    claims can be tested: "layer" (full K and V), "keys" (full K only), "anchors" (the prefix plus each
    chunk's anchor tokens). "keys" and "anchors" are served from the query cache when it holds them.
    """

    def __init__(self, pieces: list, prefix_len: int = 0, loader: LayerLoader | None = None):
        self.pieces = pieces
        self.prefix_len = prefix_len                  # leading context tokens that are never compressed
        self.starts = [0]
        for p in pieces:
            self.starts.append(self.starts[-1] + p.n_tokens)
        self.n_layers = pieces[0].n_layers if pieces else 0
        self.loader = loader if loader is not None else LayerLoader(pieces, self.n_layers, background=False)
        self.device = self.loader.device              # where compute runs; stored extras may sit on the host
        self.reads: list[tuple[str, int]] = []
        self._consumed: set[int] = set()

    @property
    def layers_read(self) -> list[int]:
        return [layer for kind, layer in self.reads if kind == "layer"]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values of every context token at `layer`: [Hkv, C, D] each."""
        if layer not in self._consumed:
            self.reads.append(("layer", layer))
            self._consumed.add(layer)
        return self.loader.layer(layer)

    def keys(self, layer: int) -> torch.Tensor:
        """Pre-RoPE keys of every context token at `layer` (no values): [Hkv, C, D]."""
        if layer in self._consumed:
            return self.loader.layer(layer)[0]
        self.reads.append(("keys", layer))
        stored = [_critical_keys(p.extras, layer) for p in self.pieces]
        if all(k is not None for k in stored):
            return torch.cat([k.to(self.device, non_blocking=True) for k in stored], dim=1)
        return self.loader.layer(layer)[0]

    def anchors(self, layer: int, ratio: float, name: str = "anchor_rank"):
        """A compressed view at `layer`: every prefix token plus, per chunk, its first ceil(ratio*n) tokens in
        the chunk's stored anchor ranking. Returns (positions [m], pre-RoPE k [Hkv, m, D], v)."""
        self.reads.append(("anchors", layer))
        positions, ks, vs = [], [], []
        for piece, start in zip(self.pieces, self.starts):
            extras = piece.extras
            if start < self.prefix_len or name not in extras:
                idx = torch.arange(piece.n_tokens)
                k, v = piece.layer(layer)
            else:
                m = max(1, math.ceil(ratio * piece.n_tokens))
                ranked = extras[name][layer][:m].long()
                order = ranked.argsort()
                idx = ranked[order]
                if "anchor_k" in extras and extras["anchor_k"].shape[2] >= m:   # in the query cache
                    k = extras["anchor_k"][layer][:, :m][:, order]
                    v = extras["anchor_v"][layer][:, :m][:, order]
                else:
                    k_full, v_full = piece.layer(layer)
                    k, v = k_full[:, idx], v_full[:, idx]
            positions.append(idx + start)
            ks.append(k.to(self.device, non_blocking=True))
            vs.append(v.to(self.device, non_blocking=True))
        return torch.cat(positions).to(self.device), torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def _critical_keys(extras: dict, layer: int) -> torch.Tensor | None:
    if "critical_k" not in extras:
        return None
    where = (extras["critical_layers"] == layer).nonzero()
    return extras["critical_k"][int(where[0])] if where.numel() else None


@dataclass
class FusionInputs:
    model: Transformer
    layout: PromptLayout
    reused: ReusedKV


@dataclass
class LayerView:
    """What the loop computed at one layer, for the rows still active."""
    layer: int
    rows: torch.Tensor        # [n] absolute positions (document rows first, then the suffix)
    n_doc_rows: int           # rows[:n_doc_rows] are document tokens
    k_fresh: torch.Tensor     # [Hkv, n, D] pre-RoPE
    v_fresh: torch.Tensor
    k_reused: torch.Tensor    # [Hkv, n_doc_rows, D] the cached values for the document rows
    v_reused: torch.Tensor
    hidden: torch.Tensor      # [n, E] the rows' output of this layer


class Selector:
    name: ClassVar[str]
    uses_cache: ClassVar[bool] = True          # False: plain prefill of everything, nothing read from the store
    refine_layers: tuple[int, ...] = ()

    def __init__(self, ratio: float = 0.15):
        if not 0.0 <= float(ratio) <= 1.0:
            raise QcfuseError(f"ratio must be within [0, 1], got {ratio}")
        self.ratio = float(ratio)

    def budget(self, layout: PromptLayout) -> int:
        """How many document tokens to recompute: the ratio always means a share of the document tokens."""
        return int(round(self.ratio * layout.n_doc_tokens))

    @classmethod
    def offline(cls, model, ids: list[int], entry: ChunkKV) -> None:
        """Add this method's small per-chunk data to `entry.extras` when a chunk is prepared (default: none)."""

    def select(self, inputs: FusionInputs) -> torch.Tensor:
        """Absolute positions of the document tokens to recompute from layer 0 (the suffix always is)."""
        raise NotImplementedError

    def refine(self, view: LayerView) -> torch.Tensor:
        """Positions (a subset of the active document rows) that stay active after `view.layer`."""
        return view.rows[: view.n_doc_rows]


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    SELECTORS[cls.name] = cls
    return cls


def make_selector(name: str, ratio: float = 0.15, **options) -> Selector:
    if name not in SELECTORS:
        raise QcfuseError(f"unknown method '{name}' (choose from: {', '.join(sorted(SELECTORS))})")
    try:
        return SELECTORS[name](ratio=ratio, **options)
    except TypeError as exc:          # an option this method does not have
        raise QcfuseError(f"bad option for method '{name}': {exc}") from None
