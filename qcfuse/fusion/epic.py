"""EPIC (Hu et al., ICML 2025): static selection of the first tokens of every chunk after the first.

A chunk prefilled alone dumps attention on its first tokens ("attention sinks"); recomputing those heads
repairs most of the damage. No scoring pass. The first chunk is used only once the others are exhausted.
"""
import torch

from .selector import Selector, register


@register
class Epic(Selector):
    name = "epic"

    def __init__(self, ratio: float = 0.15, k: int | None = None):
        super().__init__(ratio)
        self.k = k          # fixed head length per chunk; None: derived from the ratio

    def select(self, inputs):
        spans = inputs.layout.chunk_spans()
        if self.k is not None:
            heads = [min(self.k, e - s) for s, e in spans[1:]]
            return _positions(spans[1:], heads)
        budget = self.budget(inputs.layout)
        heads = _round_robin([e - s for s, e in spans[1:]], budget)
        first = _round_robin([e - s for s, e in spans[:1]], budget - sum(heads))
        return _positions(spans, first + heads)


def _round_robin(lengths: list[int], budget: int) -> list[int]:
    """Equal head lengths (capped by each chunk's length) adding up to min(budget, total)."""
    taken = [0] * len(lengths)
    left = min(budget, sum(lengths))
    while left > 0:
        for i, n in enumerate(lengths):
            if left and taken[i] < n:
                taken[i] += 1
                left -= 1
    return taken


def _positions(spans, heads) -> torch.Tensor:
    parts = [torch.arange(s, s + h) for (s, _), h in zip(spans, heads)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
