"""Fusion: the fuse loop and the selectors (one file each, registered by name)."""
from . import cacheblend, epic, fullcomp, fuserag, prophetkv, qcfuse, reuse  # noqa: F401  (registers the selectors)
from .selector import DEFAULT_METHOD, DEFAULT_RATIO, SELECTORS, FusionInputs, LayerView, ReusedKV, Selector, make_selector, register

__all__ = ["DEFAULT_METHOD", "DEFAULT_RATIO", "SELECTORS", "FusionInputs", "LayerView", "ReusedKV", "Selector", "make_selector", "register"]
