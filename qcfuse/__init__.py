"""qcfuse: query-aware KV-cache fusion for retrieval-augmented generation."""
from .engine import FusionEngine, Generation
from .errors import QcfuseError
from .fusion import SELECTORS, Selector, make_selector, register
from .integrations.vllm_request import VllmPrompt, vllm_prompt
from .model.loader import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "FusionEngine", "Generation", "QcfuseError", "SELECTORS", "Selector",
           "VllmPrompt", "load_model", "make_selector", "register", "vllm_prompt"]
__version__ = "0.1.0"
