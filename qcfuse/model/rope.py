"""Rotary position embedding, kept separate so cached keys can be stored *before* RoPE and re-rotated.

Because keys are cached pre-RoPE, moving a chunk to offset p is just applying RoPE at positions p..p+n-1:
exact, with no accumulated rotation error.
"""
from __future__ import annotations

import contextlib

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
        # the last few position sets' angles: every layer of a request rotates the same rows and the same
        # reused span, so each set is gathered once per request instead of once per layer and call
        self._recent: list[tuple[object, torch.dtype, tuple[torch.Tensor, torch.Tensor]]] = []

    def cos_sin(self, positions: torch.Tensor | range, dtype: torch.dtype,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [n, head_dim] for positions [n] (or a range: then slices of the table, no gather), from a
        table of the model's window, so the per-layer re-rotation of a whole reused context costs a gather at
        most, not n*D transcendentals per layer. Same values as computing them directly (same fp32 ops)."""
        if isinstance(positions, torch.Tensor):
            device = positions.device
        device = torch.device(device or "cpu")
        key = (device, dtype)
        if key not in self._tables:
            self._tables[key] = self._compute(torch.arange(self.max_positions, device=device), dtype)
        cos, sin = self._tables[key]
        if isinstance(positions, range):
            if positions.stop <= self.max_positions:
                return cos[positions.start:positions.stop], sin[positions.start:positions.stop]
            return self._compute(torch.arange(positions.start, positions.stop, device=device), dtype)
        # positions past the window only occur in tests and offline tools on the CPU (GPU requests are
        # checked against the window before they get here, and a device-side check would cost a sync)
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_positions:
            return self._compute(positions, dtype)
        return cos[positions], sin[positions]

    def angles(self, positions: torch.Tensor | range, dtype: torch.dtype,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the sign-folded sin that `rotate` takes, remembered for the last few position sets.
        Position tensors are taken as immutable: the same tensor object means the same positions."""
        is_range = isinstance(positions, range)
        for known, known_dtype, found in self._recent:
            # ranges compare by value; never a tensor with a range (15 us each on the host, and always False)
            if known_dtype == dtype and (known is positions or (is_range and isinstance(known, range)
                                                                and known == positions)):
                return found
        cos, sin = self.cos_sin(positions, dtype, device)
        half = sin.shape[-1] // 2
        sin_folded = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)     # rotate_half's sign, folded in
        found = (cos, sin_folded)
        self._recent = [(positions, dtype, found)] + self._recent[:3]
        return found

    @contextlib.contextmanager
    def memo_set_aside(self):
        """The angle memo starts empty inside the block and is restored after it. A CUDA graph capture
        (fusion/graphs.py) must not be served angles from outside the graph (it would bake in memory it does not
        own), nor leave its own angles behind for eager code."""
        saved, self._recent = self._recent, []
        try:
            yield
        finally:
            self._recent = saved

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor | range,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x: [heads, n, head_dim] as if its n tokens sat at `positions`; into `out` when given (e.g.
        a slice of the request's KV buffer, so the reused keys are rotated straight into place)."""
        cos, sin_folded = self.angles(positions, x.dtype, x.device)
        return rotate(x, cos, sin_folded, out)

    def apply_stacked(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: [A, heads, n, head_dim], slice a as if it sat at positions[a] ([A, n]): several layers'
        keys at their own positions in one rotation, the angles gathered once for all of them."""
        cos, sin_folded = self.angles(positions.flatten(), x.dtype, x.device)
        shape = (positions.shape[0], 1, positions.shape[1], cos.shape[-1])
        return rotate(x, cos.view(shape), sin_folded.view(shape))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, out: torch.Tensor | None = None):
    """x * cos + rotate_half(x) * sin, as x * cos + roll(x) * sin_folded: rotate_half(x) is x rolled by half
    the head dim with its first half negated, and that sign lives in sin_folded. Bit-identical (a negation
    is exact) in four kernels instead of seven."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)
    if out is None:
        return x * cos + swapped * sin_folded
    torch.mul(x, cos, out=out)
    return out.add_(swapped.mul_(sin_folded))
