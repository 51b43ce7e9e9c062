"""The two shapes a KV cache takes in qcfuse.

ChunkKV: what is stored per chunk, offline. Keys are kept *before* RoPE so the chunk can be placed at any
offset later. KVBuffer: the online, position-resolved cache of one request (keys after RoPE), preallocated
for the prompt plus the tokens to be decoded and written in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class ChunkKV:
    k: torch.Tensor   # [L, Hkv, n, D] pre-RoPE keys, computed with the chunk at positions 0..n-1
    v: torch.Tensor   # [L, Hkv, n, D]
    # small per-chunk data computed offline for selectors (e.g. QCFuse's anchor ranking), by name
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[layer]

    def layers(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[stop-start, Hkv, n, D] views, made once per entry and group (read every request, like _layers)."""
        views = self._group_views.get((start, stop))
        if views is None:
            views = self._group_views[(start, stop)] = (self.k[start:stop], self.v[start:stop])
        return views

    @cached_property
    def _group_views(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        return {}

    @cached_property
    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # views made once per entry, not once per request and layer (k and v are never reassigned)
        return list(zip(self.k.unbind(0), self.v.unbind(0)))

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v, *self.extras.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class KVBuffer:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        # uninitialized: every row is written (reused or recomputed) before any attention reads it
        self.k = torch.empty(shape, dtype=dtype, device=device)   # after RoPE
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              span: tuple[int, int] | None = None) -> None:
        """k, v [Hkv, n, D] into the rows at `positions`; `span` (start, stop) when those are contiguous."""
        if span is not None:
            self.k[layer, :, span[0]:span[1]].copy_(k)
            self.v[layer, :, span[0]:span[1]].copy_(v)
            return
        self.k[layer].index_copy_(1, positions, k)
        self.v[layer].index_copy_(1, positions, v)
