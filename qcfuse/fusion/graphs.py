"""CUDA graphs for QCFuse's question pass: replayed as one launch instead of ~2,500 operators.

Why: on a GPU the pass is host-bound. The question's few rows run through ~32 layers over the staged anchor
view: some 2,500 small operators, and on an H200 the GPU idled for most of the pass's 39-71 ms of host
time (results/bench/h200-2026-11-26-loader.md). Everything the pass reads is staged on the device before
it starts, and its shapes follow from the prompt's layout alone. So a graph captured for one request replays
for the next of the same shape; fusion/qcfuse.py pads the pass to bucket sizes, so prompts a few tokens apart
have one shape.

Policy, per model:
- The first request of a shape runs eagerly. That warms its kernels up, and a shape seen once costs nothing
  extra.
- The second request captures a graph (on a side stream, inputs copied into buffers the graph owns) and
  replays it. Later requests copy their inputs in and replay.
- At most MAX_GRAPHS shapes are kept; the least recently used one goes.
- A capture that fails turns graphs off for the process, with one warning, and the request runs eagerly.
- Only CUDA has a backend. QCFUSE_GRAPHS=0 turns graphs off; QCFUSE_GRAPHS=N keeps N shapes instead.

Memory: each kept shape holds copies of its inputs and its own pool of intermediates on the GPU (`stats()`
says how much; on Qwen3-8B's shape at 32K tokens, about the query cache's size and the scoring's fp32
attention maps). Threads take one model's graphs one at a time (a lock), and each caller gets a copy of the
output, made on its stream right after the replay.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import weakref
from typing import Callable

import torch

log = logging.getLogger("qcfuse.graphs")

MAX_GRAPHS = 4          # shapes kept per model: each holds its inputs' copies and its intermediates on the GPU
Inputs = dict[str, torch.Tensor]


class CudaGraphs:
    """Captures on one side stream per device; replays on the caller's stream."""

    def __init__(self):
        self._streams: dict[int, torch.cuda.Stream] = {}

    def capture(self, fn: Callable[..., torch.Tensor], static: Inputs) -> Callable[[], torch.Tensor]:
        device = next(iter(static.values())).device
        if device.index not in self._streams:
            self._streams[device.index] = torch.cuda.Stream(device)
            warm_up = True              # a fresh stream: let lazy per-stream set-up (cuBLAS workspaces) run first
        else:
            warm_up = False
        stream, caller = self._streams[device.index], torch.cuda.current_stream(device)
        reserved = torch.cuda.memory_reserved(device)
        stream.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            if warm_up:
                fn(**static)
            # thread_local: the layer loader's thread may be copying on its own stream meanwhile
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = fn(**static)
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:       # the capture is invalid already; the first error is the one to report
                    pass
                raise
            graph.capture_end()
        caller.wait_stream(stream)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        replay.pool_bytes = torch.cuda.memory_reserved(device) - reserved      # the graph's own pool, about
        return replay


BACKENDS: dict[str, object] = {"cuda": CudaGraphs()}


class _Graph:
    def __init__(self, static: Inputs, replay: Callable[[], torch.Tensor]):
        self.static, self.replay = static, replay
        self.nbytes = sum(t.numel() * t.element_size() for t in static.values()) + getattr(replay, "pool_bytes", 0)


class GraphCache:
    """One model's graphs, by shape key: seen once -> eager; seen again -> captured; then replayed."""

    def __init__(self, backend, max_graphs: int = MAX_GRAPHS):
        self.backend, self.max_graphs = backend, max_graphs
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self.seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.counts = collections.Counter()      # eager / capture / replay
        self.lock = threading.Lock()

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: Inputs) -> torch.Tensor:
        with self.lock:
            return self._run(key, fn, inputs)

    def _run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: Inputs) -> torch.Tensor:
        key = (key, tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items())))
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            for name, t in inputs.items():
                graph.static[name].copy_(t)
            self.counts["replay"] += 1
            return graph.replay().clone()         # the next replay overwrites the graph's own output
        if key not in self.seen:
            self.seen[key] = None
            while len(self.seen) > 8 * self.max_graphs:
                self.seen.popitem(last=False)
            self.counts["eager"] += 1
            return fn(**inputs)
        static = {name: t.clone() for name, t in inputs.items()}
        replay = self.backend.capture(fn, static)
        self.graphs[key] = _Graph(static, replay)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        self.counts["capture"] += 1
        return replay().clone()


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()      # model -> GraphCache
FAILURES: list[str] = []       # why graphs were given up in this process (the benchmark records it)


def bucket(n: int, min_step: int) -> int:
    """n rounded up to one of eight sizes per octave (so by at most 12.5%), in steps of at least min_step: the
    sizes a padded shape takes, so prompts a few tokens apart share a graph."""
    step = max(min_step, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _setting() -> int:
    """QCFUSE_GRAPHS: how many shapes to keep per model (0 or off: no graphs)."""
    raw = os.environ.get("QCFUSE_GRAPHS", "").strip().lower()
    if raw in ("", "1", "on", "true", "yes"):
        return MAX_GRAPHS
    if raw in ("0", "off", "false", "no"):
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        log.warning("qcfuse: QCFUSE_GRAPHS=%r is not a number or on/off; using %d shapes", raw, MAX_GRAPHS)
        return MAX_GRAPHS


def enabled(device: torch.device) -> bool:
    return device.type in BACKENDS and not FAILURES and _setting() > 0


def replayed(model, key: tuple, fn: Callable[..., torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """fn(**inputs), through model's graph cache when the device has graphs. fn must compute its result from
    `inputs` and from what `key` names alone (shapes are added to the key here), must not read anything back
    to the host, and must not copy from the host: a captured graph bakes in every other tensor it touches."""
    device = next(iter(inputs.values())).device
    if not enabled(device):
        return fn(**inputs)
    cache = _caches.get(model)
    if cache is None:
        cache = _caches[model] = GraphCache(BACKENDS[device.type])
    cache.max_graphs = _setting()
    try:
        with _rope_memos_set_aside(model):
            return cache.run(key, fn, inputs)
    except Exception as exc:               # e.g. an operator that cannot be captured: eager from now on
        FAILURES.append(f"{type(exc).__name__}: {str(exc)[:2000]}")
        cache.graphs.clear()
        log.warning("qcfuse: capturing the question pass as a CUDA graph failed (%s: %s); running it eagerly "
                    "from now on", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return fn(**inputs)


def counts(model) -> dict:
    """How the question pass ran on `model` so far: eager / capture / replay counts."""
    cache = _caches.get(model)
    return dict(cache.counts) if cache is not None else {}


def stats(model) -> dict:
    """counts(), the shapes kept and the GPU memory they hold (inputs' copies and pools), for the records."""
    cache = _caches.get(model)
    if cache is None:
        return {}
    return counts(model) | {"shapes_kept": len(cache.graphs),
                            "memory_mib": round(sum(g.nbytes for g in cache.graphs.values()) / 2**20, 1)}


@contextlib.contextmanager
def _rope_memos_set_aside(model):
    with contextlib.ExitStack() as stack:
        for rope in {id(layer.rope): layer.rope for layer in model.spec.layers}.values():
            stack.enter_context(rope.memo_set_aside())
        yield
