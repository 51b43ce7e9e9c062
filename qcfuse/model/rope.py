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

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, max_positions: int = 8192):
        self.inv_freq = inv_freq.float()          # [head_dim/2]
        self.attention_scaling = float(attention_scaling)
        self.max_positions = int(max_positions)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # (device, dtype) -> cos, sin [P, D]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [n, head_dim] for positions [n], gathered from a table of the model's window, so the
        per-layer re-rotation of a whole reused context costs a gather, not n*D transcendentals per layer.
        Same values as computing them directly (the table is built by the same fp32 ops)."""
        key = (positions.device, dtype)
        if key not in self._tables:
            self._tables[key] = self._compute(torch.arange(self.max_positions, device=positions.device), dtype)
        cos, sin = self._tables[key]
        # positions past the window only occur in tests and offline tools on the CPU (GPU requests are
        # checked against the window before they get here, and a device-side check would cost a sync)
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_positions:
            return self._compute(positions, dtype)
        return cos[positions], sin[positions]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x: [heads, n, head_dim] as if its n tokens sat at `positions`; into `out` when given (e.g.
        a slice of the request's KV buffer, so the reused keys are rotated straight into place)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        if out is None:
            return x * cos + rotate_half(x) * sin
        torch.mul(x, cos, out=out)
        return out.add_(rotate_half(x).mul_(sin))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
