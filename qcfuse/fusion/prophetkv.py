"""ProphetKV (Wang et al., ICML 2026): query-aware selection on the full view.

The question runs through every layer against the whole re-positioned reused context; its per-layer
attention on each document token, normalized per layer and aggregated over heads and question tokens, is
averaged over all layers. Accurate, but the whole cache must be read before fusion can start.
"""
import torch

from ..errors import QcfuseError
from .probe import question_scores
from .selector import Selector, register


@register
class ProphetKV(Selector):
    name = "prophetkv"
    query_aware = True

    def __init__(self, ratio: float = 0.15, reduction: str = "mean"):
        super().__init__(ratio)
        if reduction not in ("mean", "max"):
            raise QcfuseError("reduction must be 'mean' or 'max'")
        self.reduction = reduction

    def score_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers))

    def scores(self, inputs):
        model, layout, reused = inputs.model, inputs.layout, inputs.reused
        ctx_pos = torch.arange(layout.context_len, device=model.device)
        return question_scores(model, layout, lambda layer: (ctx_pos, *reused.layer(layer)),
                               self.score_layers(model.n_layers), reused.keys, self.reduction)
