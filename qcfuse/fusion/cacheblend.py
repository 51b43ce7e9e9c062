"""CacheBlend (Yao et al., EuroSys 2025): query-agnostic selection by KV deviation at a check layer.

Layers up to the check layer are computed for every document token; there the tokens whose fresh K/V
deviate most from the reused cache are kept for the remaining layers. With gradual filtering, a larger set
is kept at the check layer and shrunk step by step (one layer per step) down to the ratio.
"""
import torch

from ..errors import QcfuseError
from .selector import LayerView, Selector, register


@register
class CacheBlend(Selector):
    name = "cacheblend"

    def __init__(self, ratio: float = 0.15, check_layer: int = 1, deviation: str = "kv",
                 gradual: float | list[float] | None = None):
        super().__init__(ratio)
        if deviation not in ("kv", "v", "k"):
            raise QcfuseError("cacheblend deviation must be one of: kv, v (the original's choice), k")
        steps = [] if gradual is None else [float(r) for r in (gradual if isinstance(gradual, list) else [gradual])]
        if any(not self.ratio <= r <= 1.0 for r in steps) or steps != sorted(steps, reverse=True):
            raise QcfuseError("gradual ratios must shrink from <= 1 down to no lower than the ratio")
        self.check_layer, self.deviation = int(check_layer), deviation
        self.steps = steps + [self.ratio]                       # share kept after each refine layer
        self.refine_layers = tuple(range(self.check_layer, self.check_layer + len(self.steps)))

    def select(self, inputs):
        if self.refine_layers[-1] >= inputs.model.n_layers:
            raise QcfuseError(f"check layer {self.check_layer} (+{len(self.steps) - 1} gradual steps) is past "
                              f"the model's {inputs.model.n_layers} layers")
        self._n_doc = inputs.layout.n_doc_tokens
        return inputs.layout.doc_positions()

    def refine(self, view: LayerView) -> torch.Tensor:
        keep = int(round(self.steps[self.refine_layers.index(view.layer)] * self._n_doc))
        return most_deviating(view, keep, self.deviation)


def most_deviating(view: LayerView, keep: int, deviation: str = "kv") -> torch.Tensor:
    """The `keep` active document rows whose fresh K and/or V (`deviation`: "kv", "k" or "v") differ most from
    the reused cache at this layer (squared error over heads and dimensions)."""
    n = view.n_doc_rows
    score = torch.zeros(n)
    if "k" in deviation:
        score += (view.k_fresh[:, :n] - view.k_reused).float().pow(2).sum(dim=(0, 2)).cpu()
    if "v" in deviation:
        score += (view.v_fresh[:, :n] - view.v_reused).float().pow(2).sum(dim=(0, 2)).cpu()
    return view.rows[:n].cpu()[score.topk(min(keep, n)).indices]
