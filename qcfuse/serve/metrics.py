"""Prometheus metrics of one server. A private registry per app, so several apps (tests) never share counters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qcfuse_requests", "Chat completion requests received, valid or not", registry=r)
        self.errors = Counter("qcfuse_request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.disconnects = Counter("qcfuse_client_disconnects",
                                   "Requests whose client left before the answer was complete", registry=r)
        self.in_flight = Gauge("qcfuse_requests_in_flight", "Chat requests queued or running", registry=r)
        self.cache_hits = Counter("qcfuse_cache_hits", "Chunk caches found in the store, by tier ('all' when the "
                                  "store does not say which tier)", ["tier"], registry=r)
        self.cache_misses = Counter("qcfuse_cache_misses", "Chunk caches computed because no tier had them",
                                    registry=r)
        self.bytes_loaded = Counter("qcfuse_cache_bytes_loaded", "Bytes of chunk cache read from the store",
                                    registry=r)
        self.prompt_tokens = Counter("qcfuse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("qcfuse_completion_tokens", "Tokens generated", registry=r)
        self.recomputed_tokens = Counter("qcfuse_recomputed_tokens", "Document tokens recomputed", registry=r)
        self.cached_tokens = Counter("qcfuse_cached_tokens", "Document tokens reused from a cache", registry=r)
        self.ttft = Histogram("qcfuse_ttft_seconds", "Time to first token inside the engine", buckets=SECONDS,
                              registry=r)
        self.selection = Histogram("qcfuse_selection_seconds", "Time spent choosing tokens to recompute",
                                   buckets=SECONDS, registry=r)
        self.latency = Histogram("qcfuse_request_seconds", "Whole request, queueing included", buckets=SECONDS,
                                 registry=r)

    def observe(self, stats: dict) -> None:
        """Count one finished generation from the engine's stats dict."""
        tiers = stats.get("hits_by_tier")
        if isinstance(tiers, dict):
            for tier, hits in tiers.items():
                self.cache_hits.labels(tier=str(tier)).inc(hits)
        else:
            self.cache_hits.labels(tier="all").inc(stats.get("cache_hits", 0))
        self.cache_misses.inc(stats.get("cache_misses", 0))
        if stats.get("bytes_loaded") is not None:
            self.bytes_loaded.inc(stats["bytes_loaded"])
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))
        self.completion_tokens.inc(stats.get("new_tokens", 0))
        self.recomputed_tokens.inc(stats.get("recomputed_tokens", 0))
        self.cached_tokens.inc(stats.get("cached_tokens", 0))
        self.ttft.observe(stats.get("ttft_s", 0.0))
        self.selection.observe(stats.get("selection_s", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
