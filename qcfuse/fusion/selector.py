"""The Selector interface: which document tokens the fuse loop recomputes.

A selector answers once before layer 0 (`select`), and may narrow its answer after chosen layers
(`refine_layers` / `refine`) using what the loop just computed there: fresh and reused K/V of the active rows.
Selectors that need a probe of the query run it inside `select`, reading layers from `inputs.reused`
(which records what was read, so pipelining claims can be tested). Adding a selector never touches the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.kv import ChunkKV
from ..errors import QcfuseError
from ..model.transformer import Transformer
from ..prompt import PromptLayout


class ReusedKV:
    """The reused context (prefix + chunks, pre-RoPE) as one span, fetched layer by layer."""

    def __init__(self, pieces: list[ChunkKV]):
        self.pieces = pieces
        self.layers_read: list[int] = []
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values of every context token at `layer`: [Hkv, C, D] each."""
        if layer not in self._cache:
            self.layers_read.append(layer)
            self._cache[layer] = (torch.cat([p.k[layer] for p in self.pieces], dim=1),
                                  torch.cat([p.v[layer] for p in self.pieces], dim=1))
        return self._cache[layer]


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
    return SELECTORS[name](ratio=ratio, **options)
