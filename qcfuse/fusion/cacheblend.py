"""CacheBlend (Yao et al., EuroSys 2025): query-agnostic selection by KV deviation at a check layer.

Layers up to the check layer are computed for every document token; there the tokens whose fresh K/V
deviate most from the reused cache are kept for the remaining layers.
"""
import torch

from ..errors import QcfuseError
from .selector import LayerView, Selector, register


@register
class CacheBlend(Selector):
    name = "cacheblend"

    def __init__(self, ratio: float = 0.15, check_layer: int = 1, deviation: str = "kv"):
        super().__init__(ratio)
        if deviation not in ("kv", "v", "k"):
            raise QcfuseError("cacheblend deviation must be one of: kv, v, k")
        self.check_layer, self.deviation = int(check_layer), deviation
        self.refine_layers = (self.check_layer,)

    def select(self, inputs):
        if self.check_layer >= inputs.model.n_layers:
            raise QcfuseError(f"check layer {self.check_layer} >= number of layers {inputs.model.n_layers}")
        self._budget = self.budget(inputs.layout)
        return inputs.layout.doc_positions()

    def refine(self, view: LayerView) -> torch.Tensor:
        n = view.n_doc_rows
        score = torch.zeros(n)
        if "k" in self.deviation:
            score += (view.k_fresh[:, :n] - view.k_reused).float().pow(2).sum(dim=(0, 2)).cpu()
        if "v" in self.deviation:
            score += (view.v_fresh[:, :n] - view.v_reused).float().pow(2).sum(dim=(0, 2)).cpu()
        top = score.topk(self._budget).indices
        return view.rows[:n].cpu()[top]
