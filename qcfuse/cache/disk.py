"""Local disk/SSD tier: one directory per entry, one file per part, bounded in bytes with LRU eviction.

Entries are written into a private temporary directory and renamed into place in one step, so a reader never
sees a half-written entry and a writer killed mid-write leaves only a temporary directory (swept at start).
Two writers of the same key: the first rename wins, the second finds the entry there and drops its copy.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from .codec import CorruptEntry, encode_entry
from .store import EntryReader, Tier, open_blob_entry

log = logging.getLogger("qcfuse.cache")


def _part_file(part: str) -> str:
    return "meta.json" if part == "meta" else f"{part}.safetensors"


class DiskTier(Tier):
    name = "disk"

    def __init__(self, root: str | os.PathLike, max_bytes: int = 64 << 30):
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.entries_dir, self.tmp_dir = self.root / "entries", self.root / "tmp"
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from ..errors import QcfuseError
            raise QcfuseError(f"cannot use cache directory {self.root}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._sweep_temporaries()
        self._index: OrderedDict[str, int] = self._scan()     # key -> bytes, least recently used first

    # -- layout -------------------------------------------------------------------------------------------------
    def _dir(self, key: str) -> Path:
        return self.entries_dir / key[:2] / key

    def _scan(self) -> OrderedDict[str, int]:
        found = []
        for entry in self.entries_dir.glob("*/*"):
            try:
                size = sum(f.stat().st_size for f in entry.iterdir())
                found.append((entry.stat().st_mtime, entry.name, size))
            except OSError:
                continue
        return OrderedDict((key, size) for _, key, size in sorted(found))

    def _sweep_temporaries(self) -> None:
        """Remove what killed writers left behind (their process is gone, or it is over an hour old)."""
        for tmp in self.tmp_dir.iterdir():
            try:
                pid = int(tmp.name.split(".")[1])
                alive = _pid_alive(pid) and time.time() - tmp.stat().st_mtime < 3600
            except (IndexError, ValueError, OSError):
                alive = False
            if not alive:
                shutil.rmtree(tmp, ignore_errors=True)

    # -- Tier -----------------------------------------------------------------------------------------------------
    def open(self, key, fingerprint) -> EntryReader | None:
        path = self._dir(key)
        if not path.is_dir():
            with self._lock:
                self._index.pop(key, None)
            return None
        try:
            os.utime(path)                       # LRU order survives restarts through the directory's mtime
        except OSError:
            pass
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)

        def fetch(part: str):
            try:
                return (path / _part_file(part)).read_bytes()
            except FileNotFoundError:
                return None
        return open_blob_entry(self.name, key, fingerprint, fetch)

    def put(self, key, fingerprint, entry):
        if self._dir(key).is_dir():
            return                               # content-addressed: what is there is the same entry
        parts = encode_entry(key, fingerprint, entry)
        size = sum(len(b) for b in parts.values())
        if size > self.max_bytes:
            log.warning("qcfuse: a %d-byte entry exceeds the disk tier's cap (%d bytes); not stored", size,
                        self.max_bytes)
            return
        self._make_room(size)
        try:
            self._write(key, parts)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # the device is full before our cap: free the older half of the tier and try once more
            self._make_room(size, free_fraction=0.5)
            try:
                self._write(key, parts)
            except OSError as again:
                log.warning("qcfuse: disk tier full, entry not stored (%s)", again.strerror)
                return
        with self._lock:
            self._index[key] = size
            self._index.move_to_end(key)

    def delete(self, key):
        path = self._dir(key)
        with self._lock:
            self._index.pop(key, None)
        if path.is_dir():
            # move it out of sight first, so no reader opens a half-deleted entry
            trash = self.tmp_dir / f"del-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, trash)
            except OSError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    def clear(self):
        keys = list(self._scan())
        for key in keys:
            self.delete(key)
        return len(keys)

    def stats(self):
        with self._lock:
            self._index = self._scan()         # other processes may have written or evicted
            used = sum(self._index.values())
        return {"tier": self.name, "path": str(self.root), "entries": len(self._index), "bytes": used,
                "max_bytes": self.max_bytes}

    def health(self):
        for folder in (self.entries_dir, self.tmp_dir):
            if not folder.is_dir():
                return f"{folder} is missing"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable"
        return None

    # -- internals ------------------------------------------------------------------------------------------------
    def _write(self, key: str, parts: dict[str, bytes]) -> None:
        tmp = self.tmp_dir / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for part, blob in parts.items():
                _write_file(tmp / _part_file(part), blob)
            final = self._dir(key)
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(tmp, final)            # atomic: the entry appears whole or not at all
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another writer got there first with the same content
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _make_room(self, size: int, free_fraction: float = 0.0) -> None:
        with self._lock:
            used = sum(self._index.values())
            target = self.max_bytes - size
            if free_fraction:
                target = min(target, used * (1 - free_fraction))
            victims = []
            while self._index and used > target:
                key, n = self._index.popitem(last=False)
                victims.append(key)
                used -= n
        for key in victims:
            self.delete(key)


def _write_file(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["DiskTier", "CorruptEntry"]
