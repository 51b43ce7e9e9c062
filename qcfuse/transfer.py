"""Host-to-device copies that never make the host wait.

A plain `.to("cuda")` of pageable host memory blocks the host until the copy engine gets to it, and during a
request the copy engine is busy streaming KV layers: a few small uploads (token ids, row positions) would
each stall the host behind hundreds of megabytes of layers. Staged in pinned memory, the copy is queued on
the current stream and the host moves on.
"""
from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, asynchronously when that is a GPU (pinned staging; the pinned block is kept alive by
    torch's host allocator until the copy is done)."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)
