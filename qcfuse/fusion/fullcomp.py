"""Full prefill: every token computed, no cache read. The quality reference and the TTFT baseline."""
from .selector import Selector, register


@register
class FullCompute(Selector):
    name = "fullcomp"
    uses_cache = False

    def __init__(self, ratio: float = 1.0):
        super().__init__(ratio)
        self.ratio = 1.0   # everything is computed whatever ratio it is handed

    def select(self, inputs):
        return inputs.layout.doc_positions()
