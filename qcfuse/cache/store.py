"""Where chunk caches live between requests: tiers behind one small interface, composed in order.

A tier opens an entry by content key (reading only its description) and hands back a reader that fetches
the query part and single layers on demand. `TieredStore` asks its tiers fastest first, writes through to all
of them, promotes an entry served by a slow tier once it has been read whole, and treats a broken entry as a
miss (warning, entry removed). The engine talks to the TieredStore only, never to a tier.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from .codec import CorruptEntry, decode_layer, decode_layers, decode_meta, decode_tensors, layer_part
from .kv import ChunkKV

log = logging.getLogger("qcfuse.cache")


class TierUnavailable(Exception):
    """The tier cannot be reached right now (e.g. Redis down): skip it, do not delete anything."""


class EntryReader:
    """An opened entry: its size now, its parts on demand. `bytes_read` counts what was fetched."""

    tier = "?"
    n_tokens: int
    n_layers: int
    bytes_read: int = 0

    def query(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def layers(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers start..stop-1 stacked: [stop-start, Hkv, n, D] each (a tier that holds them together
        hands back one piece, so a GPU loader moves them in one copy)."""
        pairs = [self.layer(layer) for layer in range(start, stop)]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


class Tier:
    name = "?"

    def open(self, key: str, fingerprint: str) -> EntryReader | None:
        """The entry's reader, None when absent; raises CorruptEntry (bad entry) or TierUnavailable."""
        raise NotImplementedError

    def put(self, key: str, fingerprint: str, entry: ChunkKV) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def clear(self) -> int:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def health(self) -> str | None:
        """None while the tier works, else why it does not (one line). Probing a tier that was marked down
        and answers again brings it back at once."""
        return None


# -- memory ---------------------------------------------------------------------------------------------------
class MemoryReader(EntryReader):
    tier = "memory"

    def __init__(self, entry: ChunkKV, tier: str = "memory"):
        self.entry, self.tier = entry, tier
        self.n_tokens, self.n_layers = entry.n_tokens, entry.n_layers
        self.bytes_read = 0

    def query(self):
        return self.entry.extras

    def layer(self, layer):
        k, v = self.entry.layer(layer)
        self.bytes_read += k.numel() * k.element_size() * 2
        return k, v

    def layers(self, start, stop):
        k, v = self.entry.layers(start, stop)                           # views of the stored (pinned) tensors
        self.bytes_read += k.numel() * k.element_size() * 2
        return k, v


class MemoryTier(Tier):
    """In-process LRU bounded in bytes. Holds tensors: no encoding on the fast path.

    device: keep entries on this device (e.g. "cpu" in pinned memory next to a GPU, so layers stream to it
    asynchronously; or the GPU itself); None keeps them where they were computed."""
    name = "memory"

    def __init__(self, max_bytes: int = 4 << 30, device: str | None = None, pin: bool = False):
        self.max_bytes = int(max_bytes)
        self.device, self.pin = device, pin
        self._entries: OrderedDict[str, tuple[str, ChunkKV]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def open(self, key, fingerprint):
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            self._entries.move_to_end(key)
        if item[0] != fingerprint:
            raise CorruptEntry("entry written by another model")
        return MemoryReader(item[1])

    def put(self, key, fingerprint, entry):
        if entry.nbytes > self.max_bytes:
            return
        if self.device is not None or self.pin:
            entry = self._placed(entry)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1].nbytes
            self._entries[key] = (fingerprint, entry)
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    def _placed(self, entry: ChunkKV) -> ChunkKV:
        def place(t: torch.Tensor) -> torch.Tensor:
            if t.dim() <= 1 and not t.is_floating_point():
                return t.cpu()       # metadata (e.g. a layer list): read on the host, so never a device sync
            t = t.to(self.device) if self.device is not None else t
            return t.pin_memory() if self.pin and not t.is_cuda else t
        return ChunkKV(place(entry.k), place(entry.v), {name: place(t) for name, t in entry.extras.items()})

    def delete(self, key):
        with self._lock:
            item = self._entries.pop(key, None)
            if item is not None:
                self._bytes -= item[1].nbytes

    def clear(self):
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self._bytes = 0
        return n

    def stats(self):
        return {"tier": self.name, "entries": len(self._entries), "bytes": self._bytes,
                "max_bytes": self.max_bytes}


# -- encoded tiers (disk, Redis) share one reader ---------------------------------------------------------------
class BlobReader(EntryReader):
    """Reads encoded parts through `fetch(part) -> bytes | None` and verifies each one."""

    def __init__(self, tier: str, meta: dict, fetch):
        self.tier, self.meta, self._fetch = tier, meta, fetch
        self.n_tokens, self.n_layers = meta["n_tokens"], meta["n_layers"]
        self.bytes_read = 0

    def _blob(self, part: str):
        blob = self._fetch(part)
        if blob is None:
            raise CorruptEntry(f"part {part} missing")
        self.bytes_read += len(blob)
        return blob

    def query(self):
        return decode_tensors(self._blob("query"))

    def layer(self, layer):
        if not 0 <= layer < self.n_layers:
            raise IndexError(layer)
        return decode_layer(self._blob(layer_part(layer)), self.n_tokens)

    def layers(self, start, stop):
        if not 0 <= start < stop <= self.n_layers:
            raise IndexError((start, stop))
        return decode_layers([self._blob(layer_part(layer)) for layer in range(start, stop)], self.n_tokens)


def open_blob_entry(tier: str, key: str, fingerprint: str, fetch) -> EntryReader | None:
    meta = fetch("meta")
    if meta is None:
        return None
    return BlobReader(tier, decode_meta(meta, key, fingerprint), fetch)


def _whole_entry(layers: list[tuple[torch.Tensor, torch.Tensor]], query: dict) -> ChunkKV:
    return ChunkKV(torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers]), dict(query))


# -- the composition the engine sees ----------------------------------------------------------------------------
class _PromotingReader(EntryReader):
    """Passes reads through; once every layer has been read, writes the whole entry to the faster tiers."""

    def __init__(self, reader: EntryReader, promote):
        self.reader, self._promote = reader, promote
        self.tier, self.n_tokens, self.n_layers = reader.tier, reader.n_tokens, reader.n_layers
        self._query = None
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def bytes_read(self):
        return self.reader.bytes_read

    def query(self):
        if self._query is None:
            self._query = self.reader.query()
        return self._query

    def layer(self, layer):
        kv = self._layers.get(layer) or self.reader.layer(layer)
        self._keep({layer: kv})
        return kv

    def layers(self, start, stop):
        k, v = self.reader.layers(start, stop)
        self._keep({layer: (k[i], v[i]) for i, layer in enumerate(range(start, stop))})
        return k, v

    def _keep(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._layers.update(layers)
        if len(self._layers) == self.n_layers:
            self._promote(_whole_entry([self._layers[l] for l in range(self.n_layers)], self.query()))
            self._promote = lambda entry: None


@dataclass
class Lookup:
    reader: EntryReader | None
    broken: int = 0          # broken copies found and dropped before the reader (or the miss)


class TieredStore:
    def __init__(self, tiers: list[Tier] | None = None):
        self.tiers = tiers if tiers is not None else [MemoryTier()]
        self.hits: Counter[str] = Counter()       # entries served whole, by tier
        self.misses = 0                            # entries that had to be computed
        self.corrupt = 0                           # broken entries found and dropped

    def open(self, key: str, fingerprint: str) -> EntryReader | None:
        return self.lookup(key, fingerprint).reader

    def lookup(self, key: str, fingerprint: str) -> Lookup:
        """The entry's reader from the fastest tier that has it whole, and how many broken copies of it were
        found (and dropped) on the way. Counts a hit, or a miss."""
        broken = 0
        for i, tier in enumerate(self.tiers):
            try:
                reader = tier.open(key, fingerprint)
            except CorruptEntry as exc:
                self.discard(key, f"{tier.name} tier: {exc}", tiers=[tier])
                broken += 1
                continue
            except TierUnavailable:
                continue
            if reader is not None:
                self.hits[tier.name] += 1
                if i > 0:
                    faster = self.tiers[:i]
                    reader = _PromotingReader(reader, lambda e: self._write(faster, key, fingerprint, e))
                return Lookup(reader, broken)
        self.misses += 1
        return Lookup(None, broken)

    def unserved(self, tier: str) -> None:
        """An entry counted as a hit in `tier` could not be read whole after all (a broken part, or the tier
        went away mid-read) and was recomputed: it counts as a miss."""
        self.hits[tier] -= 1
        self.misses += 1

    def contains(self, key: str, fingerprint: str) -> bool:
        """Present and readable in some tier (description checked), without counting a hit."""
        for tier in self.tiers:
            try:
                if tier.open(key, fingerprint) is not None:
                    return True
            except CorruptEntry as exc:
                self.discard(key, f"{tier.name} tier: {exc}", tiers=[tier])
            except TierUnavailable:
                pass
        return False

    def put(self, key: str, fingerprint: str, entry: ChunkKV) -> None:
        """Write to the fastest tier and through to the others; a failing tier is skipped with a warning."""
        self._write(self.tiers, key, fingerprint, entry)

    def get(self, key: str, fingerprint: str) -> ChunkKV | None:
        """The whole entry, read at once (for tools and tests; the engine streams layers instead)."""
        reader = self.open(key, fingerprint)
        if reader is None:
            return None
        try:
            return _whole_entry([reader.layer(l) for l in range(reader.n_layers)], reader.query())
        except CorruptEntry as exc:
            self.discard(key, f"{reader.tier} tier: {exc}")
            return None
        except TierUnavailable:
            return None

    def discard(self, key: str, why: str, tiers: list[Tier] | None = None) -> None:
        """Drop an entry found broken (from every tier unless `tiers` says which)."""
        self.corrupt += 1
        log.warning("qcfuse: dropping cache entry %s… (%s); it will be recomputed", key[:12], why)
        for tier in tiers if tiers is not None else self.tiers:
            try:
                tier.delete(key)
            except (TierUnavailable, OSError):
                pass

    def clear(self) -> dict[str, int]:
        out = {}
        for tier in self.tiers:
            try:
                out[tier.name] = tier.clear()
            except TierUnavailable:
                out[tier.name] = 0
        return out

    def health(self) -> list[str]:
        """What is wrong with the configured tiers right now (empty when every one works)."""
        problems = []
        for tier in self.tiers:
            why = tier.health()
            if why:
                problems.append(f"{tier.name} tier: {why}")
        return problems

    def stats(self) -> list[dict]:
        out = []
        for tier in self.tiers:
            try:
                s = tier.stats()
            except TierUnavailable:
                s = {"tier": tier.name, "unavailable": True}
            out.append({**s, "hits": self.hits[tier.name]})
        return out

    @staticmethod
    def _write(tiers: list[Tier], key: str, fingerprint: str, entry: ChunkKV) -> None:
        for tier in tiers:
            try:
                tier.put(key, fingerprint, entry)
            except TierUnavailable:
                pass
            except OSError as exc:
                log.warning("qcfuse: could not write cache entry to the %s tier: %s", tier.name, exc)
