"""FuseRAG-style selection: the question's attention on the context at the final layer only."""
from .prophetkv import ProphetKV
from .selector import register


@register
class FuseRAG(ProphetKV):
    name = "fuserag"

    def score_layers(self, n_layers: int) -> list[int]:
        return [n_layers - 1]
