"""Redis tier (redis-py), for many machines sharing one cache.

An entry is one Redis hash: field "meta", field "query", and one field per layer, so a layer is one HGET.
All fields are set by a single HSET, which Redis applies atomically. Capacity is Redis's own business
(`maxmemory` + an LRU `maxmemory-policy`); entries may also be given a TTL.
When Redis cannot be reached the tier reports itself unavailable for `retry_s` seconds (one warning), and the
store serves from the local tiers; nothing fails because Redis is down.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from .codec import encode_entry
from .store import EntryReader, Tier, TierUnavailable, open_blob_entry

log = logging.getLogger("qcfuse.cache")
PREFIX = "qcfuse:kv:"


class RedisTier(Tier):
    name = "redis"

    def __init__(self, url: str, ttl_s: int | None = None, retry_s: float = 5.0, timeout_s: float = 2.0):
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 1.0))
        except ValueError as exc:
            from ..errors import QcfuseError
            raise QcfuseError(f"bad --redis_url '{url}': {exc}") from None
        self.url, self.ttl_s, self.retry_s = url, ttl_s, retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _call(self, fn):
        if time.monotonic() < self._down_until:
            raise TierUnavailable(self.url)
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            with self._lock:
                if time.monotonic() >= self._down_until:
                    log.warning("qcfuse: Redis at %s unreachable (%s); serving from the local tiers, retrying in "
                                "%.0f s", self.url, exc, self.retry_s)
                self._down_until = time.monotonic() + self.retry_s
            raise TierUnavailable(self.url) from None

    def health(self):
        try:
            self.client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_s
            return f"{self.url} unreachable ({exc})"
        with self._lock:
            self._down_until = 0.0            # back: use it again now, not after the retry delay
        return None

    def open(self, key, fingerprint) -> EntryReader | None:
        name = PREFIX + key
        return open_blob_entry(self.name, key, fingerprint,
                               lambda part: self._call(lambda: self.client.hget(name, part)))

    def put(self, key, fingerprint, entry):
        name = PREFIX + key
        if self._call(lambda: self.client.hexists(name, "meta")):
            return
        parts = encode_entry(key, fingerprint, entry)
        # meta is written with the rest in the same HSET, so no reader sees a partial hash

        def write():
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(name, mapping=parts)
            if self.ttl_s:
                pipe.expire(name, self.ttl_s)
            pipe.execute()
        try:
            self._call(write)
        except redis.exceptions.ResponseError as exc:   # e.g. OOM with a noeviction policy: skip, do not fail
            log.warning("qcfuse: Redis refused a cache entry (%s)", exc)

    def delete(self, key):
        self._call(lambda: self.client.delete(PREFIX + key))

    def _keys(self) -> list[bytes]:
        return self._call(lambda: list(self.client.scan_iter(match=PREFIX + "*", count=1000)))

    def clear(self):
        keys = self._keys()
        if keys:
            self._call(lambda: self.client.delete(*keys))
        return len(keys)

    def stats(self):
        keys = self._keys()
        used = sum(self._call(lambda: self.client.memory_usage(k)) or 0 for k in keys)
        return {"tier": self.name, "url": self.url, "entries": len(keys), "bytes": used}
