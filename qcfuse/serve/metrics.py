"""Prometheus metrics of one server. A private registry per app, so several apps (tests) never share counters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qcfuse_requests", "Completion requests received, valid or not, by route "
                                "(chat or text)", ["route"], registry=r)
        self.errors = Counter("qcfuse_request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.disconnects = Counter("qcfuse_client_disconnects",
                                   "Requests whose client left before the answer was complete", registry=r)
        self.in_flight = Gauge("qcfuse_requests_in_flight", "Requests queued or running", registry=r)
        self.queue_depth = Gauge("qcfuse_queue_depth", "Requests admitted and waiting for the engine (not the "
                                 "running one)", registry=r)
        self.running = Gauge("qcfuse_requests_running", "Requests holding the engine (0 or 1)", registry=r)
        self.cache_hits = Counter("qcfuse_cache_hits", "Chunk caches served whole from the store, by tier",
                                  ["tier"], registry=r)
        self.cache_misses = Counter("qcfuse_cache_misses", "Chunk caches computed in a request: not stored, found "
                                    "broken, or their tier went away mid-read", registry=r)
        self.cache_corrupt = Counter("qcfuse_cache_corrupt", "Chunk cache entries found broken and dropped (each "
                                     "one is also a miss)", registry=r)
        self.bytes_loaded = Counter("qcfuse_cache_bytes_loaded", "Bytes of chunk cache read from the store",
                                    registry=r)
        self.tier_bytes = Gauge("qcfuse_cache_tier_bytes", "Bytes held by each cache tier", ["tier"], registry=r)
        self.tier_entries = Gauge("qcfuse_cache_tier_entries", "Entries held by each cache tier", ["tier"],
                                  registry=r)
        self.tier_up = Gauge("qcfuse_cache_tier_up", "1 while a cache tier can be reached, else 0", ["tier"],
                             registry=r)
        self.prompt_tokens = Counter("qcfuse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("qcfuse_completion_tokens", "Tokens generated", registry=r)
        self.recomputed_tokens = Counter("qcfuse_recomputed_tokens", "Document tokens recomputed", registry=r)
        self.cached_tokens = Counter("qcfuse_cached_tokens", "Prompt tokens served from chunk caches", registry=r)
        self.question_graph = Counter("qcfuse_question_graph_runs", "QCFuse's question passes on a GPU, by how "
                                      "they ran: eager (a shape's first), capture, replay (a CUDA graph)",
                                      ["how"], registry=r)
        self.ttft = Histogram("qcfuse_ttft_seconds", "Time to first token inside the engine", buckets=SECONDS,
                              registry=r)
        self.selection = Histogram("qcfuse_selection_seconds", "Time spent choosing tokens to recompute",
                                   buckets=SECONDS, registry=r)
        self.latency = Histogram("qcfuse_request_seconds", "Whole request, queueing included", buckets=SECONDS,
                                 registry=r)

    def observe(self, stats: dict) -> None:
        """Count one finished request from the engine's stats dict."""
        for tier, hits in stats.get("hits_by_tier", {}).items():
            self.cache_hits.labels(tier=str(tier)).inc(hits)
        self.cache_misses.inc(stats.get("cache_misses", 0))
        self.cache_corrupt.inc(stats.get("cache_corrupt", 0))
        self.bytes_loaded.inc(stats.get("bytes_loaded", 0))
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))
        self.completion_tokens.inc(stats.get("new_tokens", 0))
        self.recomputed_tokens.inc(stats.get("recomputed_tokens", 0))
        self.cached_tokens.inc(stats.get("cached_tokens", 0))
        for how, n in stats.get("question_graph", {}).items():
            self.question_graph.labels(how=how).inc(n)
        self.ttft.observe(stats.get("ttft_s", 0.0))
        self.selection.observe(stats.get("selection_s", 0.0))

    def observe_store(self, tiers: list[dict]) -> None:
        """What each tier holds now (TieredStore.stats())."""
        for tier in tiers:
            name = str(tier["tier"])
            up = not tier.get("unavailable")
            self.tier_up.labels(tier=name).set(1 if up else 0)
            if up:
                self.tier_bytes.labels(tier=name).set(tier.get("bytes", 0))
                self.tier_entries.labels(tier=name).set(tier.get("entries", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
