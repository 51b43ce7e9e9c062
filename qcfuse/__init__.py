"""qcfuse: query-aware KV-cache fusion for retrieval-augmented generation."""
from .engine import Choice, FusionEngine, Generation
from .errors import QcfuseError
from .fusion import DEFAULT_METHOD, DEFAULT_RATIO, SELECTORS, Selector, make_selector, register
from .integrations.vllm_request import VllmPrompt, vllm_prompt
from .model.loader import DEFAULT_MODEL, load_model
from .sampling import SamplingParams

__all__ = ["DEFAULT_METHOD", "DEFAULT_MODEL", "DEFAULT_RATIO", "Choice", "FusionEngine", "Generation",
           "QcfuseError", "SELECTORS", "SamplingParams", "Selector", "VllmPrompt", "load_model", "make_selector",
           "register", "vllm_prompt"]
__version__ = "0.1.0"
