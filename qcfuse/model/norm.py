"""RMSNorm through torch's one fused kernel, with the transformers module's own weight and epsilon.

transformers' RMSNorm is eight elementwise operators (Gemma3's ten), and a layer runs it up to four times. On a
GPU a fused pass and the query pass are bound by the host's launches, not by the math: the fused kernel takes a
reuse request on Qwen3-8B's 36 layers from 3,440 to 2,570 host operators (scripts/count_host_ops.py). The
rounding is kept where transformers puts it (Llama-style: normalize, cast to the model's dtype, then scale;
Gemma3: scale by 1 + weight in fp32, then cast), so on the CPU the result is bitwise transformers'
(tests/test_families.py::test_fused_rms_norm_is_bitwise_transformers). On CUDA the kernel's own reduction order
may differ from `pow().mean()` in the last bit of fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What module(x) computes, for the RMSNorm modules of the supported families."""
    weight = module.weight
    eps = getattr(module, "variance_epsilon", None)
    if eps is not None:                                  # Llama, Mistral, Qwen2, Qwen3
        return F.rms_norm(x, weight.shape, eps=eps) * weight
    # Gemma3 stores the weight as an offset from 1 and scales before the cast
    return F.rms_norm(x.float(), weight.shape, weight.float() + 1.0, module.eps).to(x.dtype)
