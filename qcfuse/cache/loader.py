"""Layer-wise loading of the reused context, overlapped with compute.

`ChunkSource` is one chunk's cache as the fuse loop sees it: a reader over whichever tier served it, that
falls back to recomputing the chunk if a part turns out broken or its tier goes away mid-request (never a
wrong answer, never a failed request). `LayerLoader` reads a few layers of every chunk at a time
(`GROUP_LAYERS`), joins them into the context's [G, Hkv, C, D] K and V, and with `background=True` does so
ahead of compute in a thread, so compute waits only for the group it needs; the fuse loop places each group
into the request's buffer at once (`layers()`), and selectors read single layers (`layer()`). On
CUDA every transfer goes on the loader's own stream: each chunk's group of layers lands in one contiguous
piece by a plain DMA from pinned memory (no temporaries, no strided copy), and one kernel per group joins the
pieces; compute waits on that group's event only, never on the host. Whatever a selector stages on `stream`
before `start()` (its small query cache) arrives before the first full layer.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from ..transfer import upload
from .codec import CorruptEntry
from .kv import ChunkKV
from .store import EntryReader, MemoryReader, TierUnavailable

log = logging.getLogger("qcfuse.cache")

# Layers the background loader moves per read: each read is a copy per chunk and tensor, then a join, so groups
# cut the host work (and the launches that compete with compute's) 4x, and the first layer waits for 4. On an
# H200 (Qwen3-8B shape, pinned host memory, 32K tokens) reuse's TTFT fell from 191 to 117 ms and its load wait
# from 65 to 6 ms; QCFuse 0.15 from 474 to 450 ms (scripts/selection_breakdown.py, one process).
GROUP_LAYERS = 4


class ChunkSource:
    def __init__(self, reader: EntryReader, recompute: Callable[[], ChunkKV], on_corrupt: Callable[[str], None]):
        self.reader, self._recompute, self._on_corrupt = reader, recompute, on_corrupt
        self.n_tokens, self.n_layers = reader.n_tokens, reader.n_layers
        self.recomputed = False          # its entry failed mid-request and the chunk was computed afresh
        self.corrupt = False             # ... because a part of it was broken (not because its tier went away)
        self._extras = None
        self._lock = threading.Lock()

    @property
    def tier(self) -> str:
        return self.reader.tier

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        if self._extras is None:
            self._extras = self._guarded(lambda r: r.query())
        return self._extras

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._guarded(lambda r: r.layer(layer))

    def layers(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._guarded(lambda r: r.layers(start, stop))

    def _guarded(self, read):
        """Readers are safe to share between threads, so reads take no lock (selection must not wait behind
        the loader's read of a later layer); only the switch to a recomputed copy is serialized."""
        reader = self.reader
        try:
            return read(reader)
        except (CorruptEntry, TierUnavailable) as exc:
            with self._lock:
                if self.reader is reader:                # the first thread to notice swaps in a fresh copy
                    if isinstance(exc, CorruptEntry):
                        self.corrupt = True
                        self._on_corrupt(f"{reader.tier} tier: {exc}")
                    else:
                        log.warning("qcfuse: %s tier went away mid-request; recomputing a chunk", reader.tier)
                    fresh = MemoryReader(self._recompute(), tier="recomputed")
                    fresh.bytes_read = reader.bytes_read
                    self.reader, self.recomputed = fresh, True
            return read(self.reader)


class LayerLoader:
    def __init__(self, sources: list, n_layers: int, device: torch.device | str = "cpu",
                 background: bool = True, eager: bool = True):
        self.sources, self.n_layers = sources, n_layers
        self.device = torch.device(device)
        self.io_wait_s = 0.0
        self.stream = copy_stream(self.device) if self.device.type == "cuda" else None
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self._groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # first layer -> [G, Hkv, C, D] K, V
        self._ready = [threading.Event() for _ in range(n_layers)]
        self._events: list = [None] * n_layers          # CUDA: copy finished
        self._error: BaseException | None = None
        self._background = background and n_layers > 0
        self.eager = eager               # prefetch() starts streaming; False: the first layer() call does
        self._thread = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Begin streaming layers in the background (idempotent; the first layer() call starts it too)."""
        with self._start_lock:
            if self._background and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qcfuse-kv-loader", daemon=True)
                self._thread.start()

    def prefetch(self) -> None:
        """Before selection: start streaming now if the loader is eager (a slow tier, whose long read pays to
        overlap with selection). A lazy loader waits for the first full-layer read: its copies from memory have
        slack, and its host work beside a selection that launches work slows the selection (QCFuse 0.15 on an
        H200, Qwen3-8B shape, pinned host memory: TTFT 423 against 450 ms at 32K tokens, 224 against 231 at 16K;
        scripts/selection_breakdown.py). A selector that reads full layers starts it with its first read."""
        if self.eager:
            self.start()

    def _run(self) -> None:
        try:
            for start in range(0, self.n_layers, GROUP_LAYERS):
                self._load(start)
        except BaseException as exc:       # surfaced to the consumer, never swallowed
            self._error = exc
            for event in self._ready:
                event.set()

    def _load(self, start: int) -> None:
        """Read the group of layers that starts at `start` onto the device, and mark its layers ready."""
        stop = min(self.n_layers, start + GROUP_LAYERS)
        event = None
        if self.stream is not None:
            k, v = self._copy_to_device(start, stop)
            event = torch.cuda.Event()
            event.record(self.stream)
        else:
            k, v = self._read_group(start, stop)
            if k.device != self.device:
                k, v = k.to(self.device), v.to(self.device)
        self._groups[start] = (k, v)
        for i, layer in enumerate(range(start, stop)):
            self._events[layer] = event
            self._layers[layer] = (k[i], v[i])
            self._ready[layer].set()

    def _read_group(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers start..stop-1 of every chunk, joined along the token axis: [G, Hkv, C, D] each."""
        pairs = [s.layers(start, stop) for s in self.sources]
        return torch.cat([p[0] for p in pairs], dim=2), torch.cat([p[1] for p in pairs], dim=2)

    def _copy_to_device(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CUDA, on the loader's stream: layers start..stop-1 of every chunk joined into [G, Hkv, C, D]."""
        pairs = [s.layers(start, stop) for s in self.sources]
        with torch.cuda.stream(self.stream):
            k = torch.cat(to_device([p[0] for p in pairs], self.device), dim=2)
            v = torch.cat(to_device([p[1] for p in pairs], self.device), dim=2)
        return k, v

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if not self._background:
            if self._layers[layer] is None:
                self._load(self.span(layer).start)
        else:
            self.start()
            self._ready[layer].wait()
            if self._error is not None:
                raise self._error
            if self._events[layer] is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(self._events[layer])
                for t in self._layers[layer]:       # allocated on the copy stream, used and freed on this one
                    t.record_stream(compute)
                self._events[layer] = None
        self.io_wait_s += time.perf_counter() - t0
        return self._layers[layer]

    def span(self, layer: int) -> range:
        """The layers that arrive together with `layer`: its read group."""
        start = layer - layer % GROUP_LAYERS
        return range(start, min(self.n_layers, start + GROUP_LAYERS))

    def layers(self, span: range) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the layers in `span` (exactly one span()), as they arrived: [G, Hkv, C, D] each."""
        if span != self.span(span.start):
            raise ValueError(f"layers {span} are not one read group")
        self.layer(span.start)                      # waits for the group, and hands it to the compute stream
        return self._groups[span.start]

    def ready(self, layer: int) -> bool:
        return self._layers[layer] is not None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @property
    def bytes_loaded(self) -> int:
        return sum(s.bytes_read for s in self.sources if hasattr(s, "bytes_read"))


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_COPY_STREAMS_LOCK = threading.Lock()


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream that every request's loader copies on, per GPU. The caching allocator keeps freed blocks
    per stream: with a fresh stream per request (torch's pool cycles through 32), the layers a request streams
    (gigabytes at 32K tokens) found no cached blocks of their stream and went to cudaMalloc (~100 calls per
    request at 32K on an H200), stalling the host that launches compute."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    with _COPY_STREAMS_LOCK:
        if device not in _COPY_STREAMS:
            _COPY_STREAMS[device] = torch.cuda.Stream(device)
        return _COPY_STREAMS[device]


def to_device(pieces: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Each host piece as a contiguous device tensor, by one asynchronous copy from pinned memory (pieces
    that are not pinned are staged in pinned memory first); pieces already there pass through. Call it on the
    stream the copies should go on."""
    return [upload(t.contiguous(), device) for t in pieces]
