"""TTFT benchmark: transformers full prefill, qcfuse full prefill and fused prefill, side by side in one run."""
from .run import BenchConfig, config_names, load_config, run_bench

__all__ = ["BenchConfig", "config_names", "load_config", "run_bench"]
