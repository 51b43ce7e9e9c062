"""What differs between the supported decoder families, read off a loaded transformers model.

Everything else (projections, MLPs, embeddings) is called straight from the transformers modules, so qcfuse
computes with exactly the same weights and kernels as the reference forward; RMSNorm runs as torch's fused
kernel on the modules' weights (model/norm.py), bitwise the same on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QcfuseError
from .rope import STATIC_ROPE_TYPES, Rope

# model_type -> family name
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
}


@dataclass(frozen=True)
class LayerSpec:
    rope: Rope
    window: int | None       # sliding-window size (key j visible to query i iff i - window < j <= i), or None
    scaling: float           # softmax scale of q.k


@dataclass(frozen=True)
class FamilySpec:
    name: str
    qk_norm: bool            # Qwen3, Gemma3: RMSNorm on q and k per head, before RoPE
    sandwich_norm: bool      # Gemma3: norms after attention and around the MLP
    layers: tuple[LayerSpec, ...]
    final_softcap: float | None


def describe(hf_model) -> FamilySpec:
    cfg = hf_model.config
    family = FAMILIES.get(cfg.model_type)
    if family is None:
        raise QcfuseError(
            f"unsupported model architecture '{cfg.model_type}' (supported: {', '.join(sorted(FAMILIES))})"
        )
    if getattr(cfg, "attn_logit_softcapping", None):
        raise QcfuseError(f"attention logit soft-capping ({cfg.model_type}) is not supported")
    ropes = _ropes(hf_model)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    layers = []
    for i, block in enumerate(hf_model.model.layers):
        attn = block.self_attn
        if family == "mistral":
            window = getattr(cfg, "sliding_window", None)
        else:
            window = getattr(attn, "sliding_window", None)
        rope = ropes.get(layer_types[i], ropes.get(None))
        layers.append(LayerSpec(rope=rope, window=window, scaling=float(attn.scaling)))
    return FamilySpec(
        name=family,
        qk_norm=hasattr(hf_model.model.layers[0].self_attn, "q_norm"),
        sandwich_norm=hasattr(hf_model.model.layers[0], "pre_feedforward_layernorm"),
        layers=tuple(layers),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )


def _ropes(hf_model) -> dict[str | None, Rope]:
    """One Rope per layer type (Gemma3 has a local and a global one); key None for single-RoPE models."""
    rotary = hf_model.model.rotary_emb
    window = hf_model.config.max_position_embeddings
    params = hf_model.config.rope_parameters or {}
    if hasattr(rotary, "inv_freq"):
        _check_static(params.get("rope_type", "default"))
        return {None: Rope(rotary.inv_freq, rotary.attention_scaling, window)}
    out = {}
    for layer_type in set(hf_model.config.layer_types):
        _check_static(params[layer_type].get("rope_type", "default"))
        out[layer_type] = Rope(getattr(rotary, f"{layer_type}_inv_freq"),
                               getattr(rotary, f"{layer_type}_attention_scaling"), window)
    return out


def _check_static(rope_type: str) -> None:
    if rope_type not in STATIC_ROPE_TYPES:
        raise QcfuseError(
            f"RoPE type '{rope_type}' depends on sequence length, so chunk caches cannot be re-positioned exactly"
        )
