"""Where chunk caches live between requests. One small interface; tiers implement it."""
from __future__ import annotations

from collections import OrderedDict

from .kv import ChunkKV


class KVStore:
    """get/put by content key. The engine never knows which tier answered."""

    def get(self, key: str) -> ChunkKV | None:
        raise NotImplementedError

    def put(self, key: str, entry: ChunkKV) -> None:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


class MemoryStore(KVStore):
    """In-process LRU bounded in bytes."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0

    def get(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def __contains__(self, key):
        return key in self._entries

    def put(self, key, entry):
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def __len__(self):
        return len(self._entries)
