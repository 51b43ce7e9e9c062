"""Full reuse: every chunk cache used as is; only the suffix is computed (ratio 0)."""
import torch

from .selector import Selector, register


@register
class FullReuse(Selector):
    name = "reuse"

    def __init__(self, ratio: float = 0.0):
        super().__init__(ratio)
        self.ratio = 0.0   # reuse recomputes no document token whatever ratio it is handed

    def select(self, inputs):
        return torch.empty(0, dtype=torch.long)
