"""Rotary position embedding, kept separate so cached keys can be stored *before* RoPE and re-rotated.

Because keys are cached pre-RoPE, moving a chunk to offset p is just applying RoPE at positions p..p+n-1:
exact, with no accumulated rotation error.
"""
from __future__ import annotations

import torch

# RoPE variants whose frequencies do not depend on the sequence length (so position p means the same thing
# whether computed offline in a chunk or online in the fused prompt).
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "proportional"}


class Rope:
    """cos/sin tables for one set of inverse frequencies (a model may have one per layer type)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        self.inv_freq = inv_freq.float()          # [head_dim/2]
        self.attention_scaling = float(attention_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [n] -> cos, sin: [n, head_dim]
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: [heads, n, head_dim] as if its n tokens sat at `positions`."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
