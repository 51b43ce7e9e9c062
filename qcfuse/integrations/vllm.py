"""qcfuse inside vLLM: a KV connector that fills a request's context with qcfuse's fused K/V.

    vllm serve MODEL_DIR --kv-transfer-config '{"kv_connector": "QcfuseConnector",
        "kv_connector_module_path": "qcfuse.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"redis_url": "redis://127.0.0.1:6379/0"}}'

Scheduler side (vLLM's engine core): a request whose kv_transfer_params carry qcfuse's fusion (built by
`qcfuse.vllm_prompt`) reports its context (system prefix + documents) as externally computed, so vLLM allocates
blocks for it and computes only the question suffix. Worker side: before the forward that prefills that suffix,
qcfuse's own FusionEngine (with its own copy of the weights) builds the fused K/V of the context exactly as
`qcfuse generate` does (chunk caches from qcfuse's store, re-positioned, selected tokens recomputed) and writes
them into the request's paged blocks through the attention backend's own cache writer. vLLM then prefills the
suffix over that context, decodes and samples with its usual batching. Requests without the parameters are
plain vLLM requests; the connector does not touch them.

By default a request's fusion runs inside the step that admits it, so the running requests wait for it.
`kv_connector_extra_config: {"async_load": true}` fuses in the background instead: vLLM parks the request in
WAITING_FOR_REMOTE_KVS while one worker thread fuses its context, keeps stepping the others, and admits it at the
first step after its context is written. On a 2-core CPU the two compete for the same cores and async is slower
(README, "Serving at scale"); it is meant for a GPU, where fusion and vLLM's steps can overlap.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                 KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..errors import QcfuseError
from .vllm_request import PARAMS_KEY, FusionPlan, read_fusion

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("qcfuse.vllm")


@dataclass
class FusionLoad:
    """One request's context to fuse this step: positions [start, plan.context_len) into `block_ids`."""
    req_id: str
    plan: FusionPlan
    block_ids: list[int]
    start: int               # positions before it are vLLM's own prefix-cache hit (this same fused request)
    asynchronous: bool = False   # True: fused in the background, reported done through get_finished


@dataclass
class QcfuseConnectorMetadata(KVConnectorMetadata):
    loads: list[FusionLoad] = field(default_factory=list)


class QcfuseConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_like_vllm()
        _check_supported(vllm_config, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self.extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        # scheduler side
        self._plans: dict[str, FusionPlan | QcfuseError] = {}    # by request id, from first look to finish
        self._pending: dict[str, int] = {}                        # allocated this step: first position to write
        self._loaded: dict[str, int] = {}                         # tokens the connector supplies, by request id
        self._async_loads: list[FusionLoad] = []                  # allocated this step, fused in the background
        self._in_flight: set[str] = set()                         # async fusions not yet reported done
        self._rejected = 0
        self.async_load = self.extra.get("async_load", False)
        if not isinstance(self.async_load, bool):
            raise QcfuseError(f"kv_connector_extra_config.async_load must be true or false, got {self.async_load!r}")
        # worker side
        self._fuser = _Fuser(vllm_config, self.extra) if role == KVConnectorRole.WORKER else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False           # nothing is handed off: a preempted request is simply fused again

    # -- scheduler side -----------------------------------------------------------------------------------
    def _plan(self, request: Request) -> FusionPlan | None:
        """The request's fusion, read once; None for plain requests and for parameters that cannot apply (those
        run as plain vLLM, with the reason logged and returned in the request's kv_transfer_params)."""
        if request.request_id not in self._plans:
            try:
                plan = read_fusion(request.prompt_token_ids, request.kv_transfer_params, request.cache_salt)
            except QcfuseError as exc:
                log.warning("qcfuse: request %s runs without fusion: %s", request.request_id, exc)
                self._rejected += 1
                plan = exc
            if plan is None:
                return None
            self._plans[request.request_id] = plan
        plan = self._plans[request.request_id]
        return plan if isinstance(plan, FusionPlan) else None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        plan = self._plan(request)
        if plan is None:
            return 0, False
        external = max(0, plan.context_len - num_computed_tokens)
        return external, self.async_load and external > 0

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        plan = self._plan(request)
        if plan is not None:
            # an async request is allocated twice: with its context (fused meanwhile), then with nothing external
            # left when it is scheduled after the fusion; the first count is what the connector supplied
            if num_external_tokens > 0 or request.request_id not in self._loaded:
                self._loaded[request.request_id] = num_external_tokens
            if num_external_tokens > 0 and self.async_load:      # not scheduled this step: fused meanwhile
                self._async_loads.append(FusionLoad(request.request_id, plan, list(blocks.get_block_ids()[0]),
                                                    plan.context_len - num_external_tokens, asynchronous=True))
                self._in_flight.add(request.request_id)
            elif num_external_tokens > 0:
                self._pending[request.request_id] = plan.context_len - num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = QcfuseConnectorMetadata(loads=self._async_loads)
        self._async_loads = []
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._pending:
                start = self._pending.pop(new.req_id)
                meta.loads.append(FusionLoad(new.req_id, self._plans[new.req_id], list(new.block_ids[0]), start))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):     # resumed after preemption: new_block_ids are all its blocks
            if req_id in self._pending and req_id in cached.resumed_req_ids and cached.new_block_ids[i]:
                start = self._pending.pop(req_id)
                meta.loads.append(FusionLoad(req_id, self._plans[req_id], list(cached.new_block_ids[i][0]), start))
        if self._pending:
            log.warning("qcfuse: %d allocated request(s) were not scheduled this step", len(self._pending))
            self._pending.clear()
        return meta

    def update_connector_output(self, connector_output) -> None:
        self._in_flight.difference_update(connector_output.finished_recving or ())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        plan = self._plans.pop(request.request_id, None)
        loaded = self._loaded.pop(request.request_id, 0)
        self._pending.pop(request.request_id, None)
        # aborted while its context is being written: vLLM must keep the blocks until the worker reports it done
        busy = request.request_id in self._in_flight
        if plan is None:
            return busy, None
        if isinstance(plan, QcfuseError):
            return busy, {PARAMS_KEY: {"error": str(plan)}}
        return busy, {PARAMS_KEY: {"method": plan.method, "ratio": plan.ratio, "context_tokens": plan.context_len,
                                    "fused_tokens": loaded, "prefix_cached_tokens": plan.context_len - loaded}}

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._fuser is not None:
            return self._fuser.take_stats()
        if not self._rejected:
            return None
        stats = QcfuseStats({"requests": [], "rejected": self._rejected})
        self._rejected = 0
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return QcfuseStats(data) if data is not None else QcfuseStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return QcfusePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- worker side --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._fuser.bind_layers(list(kv_caches))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        for load in self._get_connector_metadata().loads:
            if load.asynchronous:
                self._fuser.submit(load, forward_context.no_compile_layers)
            else:
                self._fuser.fill(load, forward_context.no_compile_layers)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self._fuser.take_finished() if self._fuser is not None else set()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._fuser.take_failed_blocks() if self._fuser is not None else set()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return                 # every layer is written before the forward starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return                 # chunk caches are qcfuse's own, computed from chunks alone: nothing to save

    def wait_for_save(self) -> None:
        return


def _log_like_vllm() -> None:
    """qcfuse's messages (this connector's, the store's Redis warnings) through vLLM's handlers and level."""
    ours, theirs = logging.getLogger("qcfuse"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level)
        ours.propagate = False


def _check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Refuse, at start-up and in words, the set-ups the connector cannot fill correctly."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise QcfuseError("the qcfuse connector supports tensor_parallel_size=1 and pipeline_parallel_size=1 only "
                          "(scale out with data parallelism or replicas sharing a Redis chunk store)")
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            raise QcfuseError("the qcfuse connector needs a model whose layers share one full-attention KV cache "
                              f"group; this one has {len(groups)} group(s)")


class _Fuser:
    """The worker side: qcfuse's engine on its own copy of the weights, and the writes into vLLM's cache."""

    def __init__(self, vllm_config: VllmConfig, extra: dict):
        from ..cache import open_store
        from ..engine import FusionEngine
        from ..model.loader import load_model
        dtype = vllm_config.model_config.dtype
        t0 = time.perf_counter()
        loaded = load_model(str(extra.get("model") or vllm_config.model_config.model), dtype=dtype, quiet=True)
        device = torch.device(vllm_config.device_config.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type != "cpu":
            loaded.hf.to(device)
            loaded.transformer.device = device
        store = open_store(cache_dir=extra.get("cache_dir"), redis_url=extra.get("redis_url"),
                           memory_bytes=int(float(extra.get("memory_gb", 4)) * (1 << 30)))
        self.engine = FusionEngine(loaded, store)
        self.model = loaded.transformer
        self.engine.warmup()
        self.block_size = vllm_config.cache_config.block_size
        self.layers: dict[str, int] = {}          # vLLM attention layer name -> qcfuse layer index
        self._records: list[dict] = []
        self._failed_blocks: set[int] = set()
        # one background thread: fusions run one at a time, beside vLLM's steps rather than inside them
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcfuse-fuse")
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()
        log.info("qcfuse: connector worker ready in %.1f s (own copy of %s, %s; store: %s)", time.perf_counter() - t0,
                 loaded.name, dtype, ", ".join(t.name for t in store.tiers))

    def bind_layers(self, names: list[str]) -> None:
        layers = {name: extract_layer_index(name) for name in names}
        if sorted(layers.values()) != list(range(self.model.n_layers)):
            raise QcfuseError(f"vLLM's model has attention layers {sorted(layers.values())}, qcfuse's copy has "
                              f"{self.model.n_layers}: set kv_connector_extra_config.model to the served model")
        self.layers = layers

    def submit(self, load: FusionLoad, attention_layers: dict) -> None:
        self._running[load.req_id] = self._pool.submit(self.fill, load, attention_layers)

    def take_finished(self) -> set[str]:
        done = {req_id for req_id, future in self._running.items() if future.done()}
        for req_id in done:
            self._running.pop(req_id).result()      # fill() never raises: failures are failed blocks
        return done

    def fill(self, load: FusionLoad, attention_layers: dict) -> None:
        """Fuse the request's context and write positions [load.start, context_len) into its blocks. A failure
        marks those blocks as not loaded, so vLLM fails the request (or recomputes it, per its
        kv_load_failure_policy) instead of reading garbage."""
        from ..fusion import make_selector
        plan, t0 = load.plan, time.perf_counter()
        positions = torch.arange(load.start, plan.context_len)
        blocks = torch.tensor(load.block_ids, dtype=torch.long)[positions // self.block_size]
        try:
            selector = make_selector(plan.method, plan.ratio, **plan.options)
            # vLLM computes the question itself: qcfuse fills the context only
            out, stats = self.engine.prefill(plan.layout, selector, max_new_tokens=1, context_only=True)
            slots = (blocks * self.block_size + positions % self.block_size).to(self.model.device)
            span = slice(load.start, plan.context_len)
            for name, index in self.layers.items():
                layer = attention_layers[name]
                key = out.buffer.k[index, :, span].transpose(0, 1).contiguous()     # [n, Hkv, D], after RoPE
                value = out.buffer.v[index, :, span].transpose(0, 1).contiguous()
                layer.impl.do_kv_cache_update(layer, key, value, layer.kv_cache, slots)
        except QcfuseError as exc:      # parameters only the model can check, e.g. a critical layer it lacks
            log.error("qcfuse: request %s not fused, its blocks are reported as not loaded: %s", load.req_id, exc)
            with self._lock:
                self._failed_blocks.update(int(b) for b in blocks.unique())
            return
        except Exception:
            log.exception("qcfuse: could not fuse the context of request %s; its blocks are reported as not loaded",
                          load.req_id)
            with self._lock:
                self._failed_blocks.update(int(b) for b in blocks.unique())
            return
        record = {
            "context_tokens": plan.context_len, "written_tokens": len(positions),
            "recomputed_tokens": stats["recomputed_tokens"], "cache_hits": stats["cache_hits"],
            "cache_misses": stats["cache_misses"], "hits_by_tier": stats["hits_by_tier"],
            "selection_s": stats["selection_s"], "fuse_s": time.perf_counter() - t0, "method": plan.method}
        with self._lock:
            self._records.append(record)
        log.debug("qcfuse: request %s: %s", load.req_id, record)

    def take_stats(self) -> QcfuseStats | None:
        with self._lock:
            records, self._records = self._records, []
        return QcfuseStats({"requests": records, "rejected": 0}) if records else None

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed


@dataclass
class QcfuseStats(KVConnectorStats):
    """Per fused request: tokens, chunk cache hits by tier, selection and fusion time; and requests refused."""

    def __post_init__(self):
        if not self.data:
            self.reset()

    def reset(self):
        self.data = {"requests": [], "rejected": 0}

    def is_empty(self) -> bool:
        return not self.data["requests"] and not self.data["rejected"]

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data["requests"] = self.data["requests"] + list(other.data.get("requests", []))
        self.data["rejected"] += int(other.data.get("rejected", 0))
        return self

    def reduce(self) -> dict[str, int | float]:
        records = self.data["requests"]
        n = len(records)
        total = Counter()
        for r in records:
            total.update({k: r[k] for k in ("context_tokens", "recomputed_tokens", "cache_hits", "cache_misses")})
        return {"qcfuse_fused_requests": n, "qcfuse_rejected_requests": self.data["rejected"],
                "qcfuse_context_tokens": total["context_tokens"],
                "qcfuse_recomputed_tokens": total["recomputed_tokens"],
                "qcfuse_chunk_hits": total["cache_hits"], "qcfuse_chunk_misses": total["cache_misses"],
                "qcfuse_avg_selection_ms": round(1e3 * sum(r["selection_s"] for r in records) / n, 2) if n else 0.0,
                "qcfuse_avg_fuse_ms": round(1e3 * sum(r["fuse_s"] for r in records) / n, 2) if n else 0.0}


class QcfusePromMetrics(KVConnectorPromMetrics):
    """The same stats on vLLM's /metrics (and `LLM.get_metrics()`)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def counter(name, doc, extra_labels=()):
            return self._counter_cls(name=f"vllm:qcfuse_{name}", documentation=doc,
                                     labelnames=labelnames + list(extra_labels))

        def histogram(name, doc):
            return self._histogram_cls(name=f"vllm:qcfuse_{name}", documentation=doc, labelnames=labelnames,
                                       buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])

        self.requests = counter("fused_requests", "Requests whose context qcfuse fused")
        self.rejected = counter("rejected_requests", "Requests with qcfuse parameters that could not apply (run plain)")
        self.context_tokens = counter("context_tokens", "Context tokens (system prefix + documents) of fused requests")
        self.recomputed_tokens = counter("recomputed_tokens", "Document tokens recomputed by the selector")
        self.chunk_hits = counter("chunk_cache_hits", "Document chunks read from qcfuse's store", ["tier"])
        self.chunk_misses = counter("chunk_cache_misses", "Document chunks prefilled because no tier had them")
        self.selection = histogram("selection_seconds", "Time the selector took to pick the tokens to recompute")
        self.fuse = histogram("fuse_seconds", "Time to fuse a request's context and write it into vLLM's cache")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        labels = self.per_engine_labelvalues[engine_idx]
        if transfer_stats_data.get("rejected"):
            self.rejected.labels(*labels).inc(transfer_stats_data["rejected"])
        for r in transfer_stats_data.get("requests", []):
            self.requests.labels(*labels).inc()
            self.context_tokens.labels(*labels).inc(r["context_tokens"])
            self.recomputed_tokens.labels(*labels).inc(r["recomputed_tokens"])
            for tier, hits in r["hits_by_tier"].items():
                self.chunk_hits.labels(*labels, tier).inc(hits)
            self.chunk_misses.labels(*labels).inc(r["cache_misses"])
            self.selection.labels(*labels).observe(r["selection_s"])
            self.fuse.labels(*labels).observe(r["fuse_s"])
