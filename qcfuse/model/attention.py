"""The attention seam: how a set of rows attends over the keys, with the kernel chosen on the host.

Rows are tokens at sorted absolute positions; keys sit at consecutive positions key_start, key_start+1, ...
(the prompt's KV buffer, or a span being prefilled). Row r sees key j iff j <= r, and r - window < j on a
sliding-window layer. A plan is built once per request from the rows on the host, so no kernel ever reads a
position back from the device (no host syncs in the layer loop), and the layer step never knows which
kernel ran:

  kernel     shape                                              how
  causal     the rows are exactly the keys, no window in reach  SDPA is_causal (flash on CUDA), no mask
  all_keys   every row sees every key (decoding one token)      SDPA without a mask
  flex       any other rows, CUDA                               FlexAttention; block mask from the host rows
  blocked    any other rows (CPU; CUDA when asked)              row blocks, each over its own key range, sliced
                                                                from one additive mask built per request
  dense      arbitrary key positions (the small query probes)   one additive mask

`RowGroups` steps several plans' rows through one layer at once, each group attending in turn.

`QCFUSE_ATTENTION=flex|blocked` (or `Transformer.scattered_kernel`) overrides the choice for scattered rows.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
import torch.nn.functional as F

from ..transfer import upload

log = logging.getLogger("qcfuse.attention")

CPU_BLOCK = 128          # rows per block on the CPU (measured best there)
CUDA_BLOCK = 1024        # rows per block on CUDA: fewer, larger calls fill the SMs
FLEX_BLOCK = 128         # FlexAttention's tile, in rows and keys
KERNELS = ("flex", "blocked")


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Position-causal (and sliding-window) visibility: [n, N] bool."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen &= k_pos[None, :] > q_pos[:, None] - window
    return seen


def additive_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype) -> torch.Tensor:
    """The same visibility as an additive mask [n, N] (0 or -inf), built once and sliced, never per call."""
    bias = torch.zeros((q_pos.shape[0], k_pos.shape[0]), dtype=dtype, device=q_pos.device)
    return bias.masked_fill_(~visible(q_pos, k_pos, window), float("-inf"))


def default_kernel(device: torch.device) -> str:
    """The kernel for scattered rows: FlexAttention on CUDA when it can be compiled there, else row blocks."""
    chosen = os.environ.get("QCFUSE_ATTENTION", "").strip().lower()
    if chosen in KERNELS:
        return chosen
    return "flex" if device.type == "cuda" and _flex_available() else "blocked"


def _sdpa(q, keys, values, scale, mask=None, causal=False):
    """q [H, n, D] over keys/values [Hkv, N, D] -> [H, n, D]."""
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=None if mask is None
                                          else mask[None, None], is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[0] != keys.shape[0])[0]


class RowAttention:
    """Attention of sorted rows over the consecutive keys key_start..key_start+n_keys-1, planned on the host.

    `rows` (device) and `span` serve the layer step (RoPE, writing fresh K/V); calling the plan with a layer's
    window runs that window's kernel. Kernels are built on first use, one per window, and reused by every
    layer that shares the window.
    """

    def __init__(self, rows, n_keys: int, device: torch.device, dtype: torch.dtype, key_start: int = 0,
                 kernel: str | None = None):
        rows_host = (torch.arange(rows.start, rows.stop) if isinstance(rows, range)
                     else torch.as_tensor(rows, dtype=torch.long).cpu())
        self.n_rows, self.n_keys, self.key_start = rows_host.numel(), int(n_keys), int(key_start)
        self.device, self.dtype = torch.device(device), dtype
        self.rel = rows_host - self.key_start          # [n] ascending, positions within the keys (host)
        if self.n_rows and (int(self.rel[0]) < 0 or int(self.rel[-1]) >= self.n_keys):
            raise ValueError("rows must lie within the keys")
        first, last = (int(rows_host[0]), int(rows_host[-1])) if self.n_rows else (0, -1)
        self.span = (first, last + 1) if last - first + 1 == self.n_rows else None   # contiguous rows
        self.rows = upload(rows_host, self.device)
        self.kernel = kernel or default_kernel(self.device)
        self._by_window: dict[int | None, object] = {}

    @property
    def groups(self) -> tuple[RowAttention, ...]:
        return (self,)

    def window_matters(self, window: int | None) -> bool:
        """False when no row is far enough from the first key for the window to hide anything."""
        return window is not None and self.n_rows > 0 and int(self.rel[-1]) >= window

    def kernel_for(self, window: int | None):
        if window not in self._by_window:
            self._by_window[window] = self._plan(window if self.window_matters(window) else None)
        return self._by_window[window]

    def _plan(self, window: int | None):
        n, big_n = self.n_rows, self.n_keys
        if window is None and self.span is not None and n == big_n:
            return _Causal()
        if window is None and n and int(self.rel[0]) >= big_n - 1:
            return _AllKeys()
        if self.kernel == "flex":
            return _Flex(self.rel, big_n, window, self.device)
        block = CUDA_BLOCK if self.device.type == "cuda" else CPU_BLOCK
        return _Blocked(self.rel, big_n, window, block, self.device, self.dtype)

    def __call__(self, window: int | None, q, keys, values, scale: float) -> torch.Tensor:
        """q [H, n, D] of the rows, keys [Hkv, N, D] (after RoPE) and values -> [H, n, D]."""
        if self.kernel != "flex":
            return self.kernel_for(window)(q, keys, values, scale)
        try:
            return self.kernel_for(window)(q, keys, values, scale)
        except Exception as exc:        # e.g. no compiler for this GPU: row blocks compute the same thing
            if not isinstance(self._by_window.get(window), (_Flex, type(None))):
                raise                   # another kernel's error (out of memory, say) is not FlexAttention's
            _flex_failed(exc)
            self.kernel = "blocked"
            self._by_window.clear()
            return self.kernel_for(window)(q, keys, values, scale)

    @property
    def kernels(self) -> dict:
        """Which kernel each window used (for the benchmark's record)."""
        return {str(w): type(k).__name__.strip("_").lower() for w, k in self._by_window.items()}


class RowGroups:
    """Groups of rows that go through a layer together but attend in order (Transformer.layer_step): each group
    writes its fresh K/V, then attends over the keys as the groups before it left them, never seeing a later
    group's writes. Projections and MLP run once over all rows, in group order. Ratio auto's reuse check steps
    plain reuse's suffix rows this way, first, beside a fused pass's rows (fusion/fuse.py)."""

    def __init__(self, groups: list[RowAttention]):
        self.groups = tuple(groups)
        self.rows = torch.cat([g.rows for g in groups])          # [n] device, group after group
        self.n_rows = sum(g.n_rows for g in groups)


class DenseAttention:
    """Query rows over keys at arbitrary positions (a compressed view plus the rows themselves): one masked
    call. Only for the few rows of a query probe, where a dense [n, N] mask is small."""

    def __init__(self, q_pos: torch.Tensor, k_pos: torch.Tensor):
        self.rows, self.k_pos = q_pos, k_pos
        self._masks: dict[int | None, torch.Tensor] = {}

    def __call__(self, window, q, keys, values, scale):
        if window not in self._masks:
            self._masks[window] = additive_mask(self.rows, self.k_pos, window, q.dtype)
        return _sdpa(q, keys, values, scale, self._masks[window])


# -- kernels ----------------------------------------------------------------------------------------------
class _Causal:
    def __call__(self, q, keys, values, scale):
        return _sdpa(q, keys, values, scale, causal=True)


class _AllKeys:
    def __call__(self, q, keys, values, scale):
        return _sdpa(q, keys, values, scale)


class _Blocked:
    """Blocks of rows, each attending only over the keys some row of the block can see (trimmed on both
    sides: causally above, by the window below); the per-block key ranges come from the host rows."""

    def __init__(self, rel: torch.Tensor, n_keys: int, window: int | None, block: int, device, dtype):
        align = 8 if device.type == "cuda" else 1         # mask slices stay aligned for the fused kernels
        self.blocks = []
        for a in range(0, rel.numel(), block):
            b = min(rel.numel(), a + block)
            lo = 0 if window is None else max(0, int(rel[a]) - window + 1)
            hi = int(rel[b - 1]) + 1
            self.blocks.append((a, b, lo // align * align, min(n_keys, -(-hi // align) * align)))
        rel_dev = upload(rel, device)
        self.mask = additive_mask(rel_dev, torch.arange(n_keys, device=device), window, dtype)

    def __call__(self, q, keys, values, scale):
        if len(self.blocks) == 1:
            _, _, lo, hi = self.blocks[0]
            return _sdpa(q, keys[:, lo:hi], values[:, lo:hi], scale, self.mask[:, lo:hi])
        out = q.new_empty(q.shape[0], q.shape[1], values.shape[2])
        for a, b, lo, hi in self.blocks:
            out[:, a:b] = _sdpa(q[:, a:b], keys[:, lo:hi], values[:, lo:hi], scale, self.mask[a:b, lo:hi])
        return out


class _Flex:
    """FlexAttention with a block mask derived from the host rows: per 128-row tile, the key tiles every row
    sees in full (no mask evaluated), the tiles some row sees in part, and nothing beyond. Rows and keys are
    padded to whole tiles (one contiguous copy each, ~1 ms per request at 32K), so the compiled kernel sees the
    same few shape classes whatever the request (compiled once, no per-shape specializations)."""

    def __init__(self, rel: torch.Tensor, n_keys: int, window: int | None, device):
        from torch.nn.attention.flex_attention import BlockMask
        self.n, self.n_keys = rel.numel(), n_keys
        self.n_pad, self.keys_pad = _whole_tiles(self.n), _whole_tiles(n_keys)
        padded = torch.cat([rel, rel[-1:].expand(self.n_pad - self.n)])        # extra rows repeat the last
        rows = upload(padded.to(torch.int32), device)

        def mask_mod(b, h, q_idx, kv_idx):
            r = rows[q_idx]
            seen = kv_idx <= r
            if window is not None:
                seen = seen & (kv_idx > r - window)
            return seen

        # padded keys (>= n_keys) are never visible: every row lies below n_keys. Built on the device from the
        # uploaded rows: a handful of small kernels, and no copy that would wait for the GPU
        partial, full = tile_visibility(rows, self.keys_pad, window, FLEX_BLOCK)
        tiles = [_ordered(m) for m in (partial, full)]
        self.block_mask = BlockMask.from_kv_blocks(*tiles[0], *tiles[1], BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                                   seq_lengths=(self.n_pad, self.keys_pad))

    def __call__(self, q, keys, values, scale):
        q = F.pad(q, (0, 0, 0, self.n_pad - self.n))                            # [H, n_pad, D] contiguous
        keys = F.pad(keys, (0, 0, 0, self.keys_pad - self.n_keys))             # [Hkv, N_pad, D]
        values = F.pad(values, (0, 0, 0, self.keys_pad - self.n_keys))
        out = flex_kernel(q.device.type)(q[None], keys[None], values[None], block_mask=self.block_mask,
                                         scale=scale, enable_gqa=q.shape[0] != keys.shape[0])
        return out[0, :, :self.n]


def _whole_tiles(n: int) -> int:
    return -(-n // FLEX_BLOCK) * FLEX_BLOCK


def tile_visibility(rel: torch.Tensor, n_keys: int, window: int | None, tile: int):
    """Which (row tile, key tile) pairs some row sees in part, and which every row sees in full: two
    [row tiles, key tiles] bool maps, from the sorted rows (on whichever device they are)."""
    n = rel.numel()
    starts = torch.arange(0, n, tile, device=rel.device)
    lo, hi = rel[starts], rel[torch.clamp(starts + tile, max=n) - 1]          # first and last row per tile
    k0 = torch.arange(0, n_keys, tile, device=rel.device)
    k1 = torch.clamp(k0 + tile, max=n_keys) - 1                                # first and last key per tile
    w = n_keys + n + 1 if window is None else window                           # "no window" reaches everything
    some = (k0[None] <= hi[:, None]) & (k1[None] > lo[:, None] - w)
    every = (k1[None] <= lo[:, None]) & (k0[None] > hi[:, None] - w)
    return some & ~every, every


def _ordered(tiles: torch.Tensor):
    """[row tiles, key tiles] bool -> (count [1, 1, R], ascending key-tile indices first [1, 1, R, K]) int32."""
    order = torch.argsort((~tiles).to(torch.int8), dim=1, stable=True)
    return tiles.sum(1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None].contiguous()


def _flex_failed(exc: Exception) -> None:
    global _FLEX_BROKEN
    _FLEX_BROKEN = True
    FLEX_ERRORS.append(f"{type(exc).__name__}: {str(exc)[:4000]}")
    log.warning("qcfuse: FlexAttention failed (%s: %s); using row blocks for scattered rows from now on",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


_FLEX_BROKEN = False
FLEX_ERRORS: list[str] = []      # why FlexAttention was given up (the benchmark records it)


def _flex_available() -> bool:
    if _FLEX_BROKEN:
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def flex_kernel(device_type: str):
    """flex_attention compiled once for every shape on CUDA (dynamic shapes: requests differ in rows and keys),
    eager elsewhere (correct but unfused: only the CPU tests use it)."""
    from torch.nn.attention.flex_attention import flex_attention
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    return flex_attention
