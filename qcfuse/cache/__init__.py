"""Chunk KV caches: content keys, storage tiers, and the layer-wise loader."""
from __future__ import annotations


def open_store(cache_dir: str | None = None, redis_url: str | None = None, memory_bytes: int = 4 << 30,
               disk_bytes: int = 64 << 30):
    """The store a CLI command or server uses: memory, then a local directory, then Redis (each optional)."""
    from .store import MemoryTier, TieredStore
    tiers = [MemoryTier(memory_bytes)]
    if cache_dir:
        from .disk import DiskTier
        tiers.append(DiskTier(cache_dir, disk_bytes))
    if redis_url:
        from .redis_tier import RedisTier
        tiers.append(RedisTier(redis_url))
    return TieredStore(tiers)
