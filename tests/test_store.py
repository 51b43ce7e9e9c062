"""The tiered KV store: round trips, content keys, promotion, eviction, and every fault the issue names.

Store-level tests use small random entries; engine-level tests use the real default model and check that a
fault never changes the answer. Redis is the real server (started by .ci/run; a private one when absent).
"""
import errno
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from qcfuse import FusionEngine, make_selector
from qcfuse.cache import open_store
from qcfuse.cache import disk as disk_module
from qcfuse.cache.codec import CorruptEntry
from qcfuse.cache.disk import DiskTier
from qcfuse.cache.keys import chunk_key
from qcfuse.cache.kv import ChunkKV
from qcfuse.cache.redis_tier import RedisTier
from qcfuse.cache.store import MemoryTier, TieredStore, TierUnavailable
from servers import free_port, redis_for_tests, start_redis

FP = "fingerprint-of-model-a"
DOCS = ["The lighthouse on Gull Island was built in 1871 and painted red in 1903.",
        "Its keeper, Ada Brann, kept a log of every ship that passed for forty years.",
        "A storm in 1952 destroyed the keeper's cottage but spared the tower."]
QUESTION = "Who kept the log at the lighthouse?"


def _entry(seed: int = 0, n: int = 16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(4, 2, n, 8, generator=g), torch.randn(4, 2, n, 8, generator=g),
                   {"anchor_rank": torch.randperm(n, generator=g).to(torch.int32)[None].repeat(4, 1)})


def _same(a: ChunkKV, b: ChunkKV) -> bool:
    return torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.extras["anchor_rank"],
                                                                          b.extras["anchor_rank"])


@pytest.fixture(scope="module")
def redis_url():
    """The shared test Redis (REDIS_URL, default loopback 6379, db 15); a private server when none answers."""
    with redis_for_tests(os.environ.get("QCFUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")) as url:
        yield url


@pytest.fixture
def redis_tier(redis_url):
    tier = RedisTier(redis_url)
    tier.clear()
    yield tier
    tier.clear()


@pytest.fixture(params=["memory", "disk", "redis"])
def tier(request, tmp_path):
    if request.param == "memory":
        return MemoryTier()
    if request.param == "disk":
        return DiskTier(tmp_path / "kv")
    return request.getfixturevalue("redis_tier")


# -- every tier ---------------------------------------------------------------------------------------------------
def test_round_trip_layer_by_layer(tier):
    entry = _entry()
    assert tier.open("k1", FP) is None
    tier.put("k1", FP, entry)
    reader = tier.open("k1", FP)
    assert (reader.n_tokens, reader.n_layers) == (16, 4)
    k2, v2 = reader.layer(2)
    assert torch.equal(k2, entry.k[2]) and torch.equal(v2, entry.v[2])
    assert torch.equal(reader.query()["anchor_rank"], entry.extras["anchor_rank"])
    assert tier.stats()["entries"] == 1
    tier.delete("k1")
    assert tier.open("k1", FP) is None


def test_encoded_tiers_fetch_one_layer_alone(tmp_path, redis_tier):
    """Layer-addressable: reading layer 3 fetches that layer's part, not the entry."""
    entry = _entry(n=64)
    for tier in (DiskTier(tmp_path / "kv"), redis_tier):
        tier.put("k1", FP, entry)
        reader = tier.open("k1", FP)
        reader.layer(3)
        one_layer = entry.k[3].numel() * 4 * 2
        assert one_layer <= reader.bytes_read < one_layer + 1024, tier.name


def test_encoded_tiers_decode_a_group_straight_into_one_tensor(tmp_path, redis_tier, monkeypatch):
    """A group of layers comes back exactly as stored, decoded into one [G, Hkv, n, D] tensor (no per-layer
    tensors stacked after), counted in bytes_read; a bad part anywhere in the group is a corrupt entry."""
    from qcfuse.cache import codec
    from qcfuse.cache import store as store_module
    entry = _entry(n=32)
    bf16 = ChunkKV(entry.k.bfloat16(), entry.v.bfloat16(), entry.extras)
    for tier in (DiskTier(tmp_path / "kv"), redis_tier):
        for key, stored in (("k32", entry), ("k16", bf16)):
            tier.put(key, FP, stored)
            reader = tier.open(key, FP)
            monkeypatch.setattr(store_module, "decode_layer", None)      # the group path must not take it
            k, v = reader.layers(1, 4)
            monkeypatch.undo()
            assert k.dtype == stored.k.dtype and k.shape == (3, 2, 32, 8), tier.name
            assert torch.equal(k, stored.k[1:4]) and torch.equal(v, stored.v[1:4]), tier.name
            one_layer = stored.k[0].numel() * stored.k.element_size() * 2
            assert 3 * one_layer <= reader.bytes_read < 3 * one_layer + 3 * 1024
            with pytest.raises(IndexError):
                reader.layers(2, 5)
    blobs = codec.encode_entry("k", FP, entry)
    good = [blobs[codec.layer_part(layer)] for layer in range(3)]
    other = codec.encode_tensors({"k": torch.zeros(2, 31, 8), "v": torch.zeros(2, 31, 8)})   # another length
    halves = codec.encode_tensors({"k": torch.zeros(2, 32, 8).half(), "v": torch.zeros(2, 32, 8).half()})
    flipped = bytearray(good[1])
    flipped[-5] ^= 0x10
    for bad in (other, halves, bytes(flipped), good[1][: len(good[1]) // 2], b"junk"):
        with pytest.raises(CorruptEntry):
            codec.decode_layers([good[0], bad, good[2]], 32)
    with pytest.raises(CorruptEntry):
        codec.decode_layers(good, 31)
    # a header (outside the checksum) that claims a huge shape is refused, checked before anything is allocated
    (n,) = struct.unpack("<Q", good[0][:8])
    header = json.loads(good[0][8:8 + n])
    header["k"]["shape"] = [10 ** 6, 32, 10 ** 6]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(CorruptEntry):
        codec.decode_layers([struct.pack("<Q", len(text)) + text + good[0][8 + n:]], 32)


def test_foreign_model_entry_is_refused(tier):
    tier.put("k1", FP, _entry())
    with pytest.raises(CorruptEntry, match="another model"):
        tier.open("k1", "fingerprint-of-model-b")


def test_keys_are_content_addresses():
    ids = [5, 6, 7]
    assert chunk_key(FP, ids) == chunk_key(FP, list(ids))
    assert chunk_key(FP, ids) != chunk_key("other model", ids)
    assert chunk_key(FP, ids) != chunk_key(FP, [5, 6, 8])


# -- composition ----------------------------------------------------------------------------------------------------
def test_write_through_and_promotion(tmp_path, redis_tier):
    memory, disk = MemoryTier(), DiskTier(tmp_path / "kv")
    store = TieredStore([memory, disk, redis_tier])
    entry = _entry()
    store.put("k1", FP, entry)
    assert all(t.open("k1", FP) is not None for t in (memory, disk, redis_tier))   # written through

    memory.clear(), disk.clear()
    reader = store.open("k1", FP)                   # only Redis has it now
    assert reader.tier == "redis" and store.hits["redis"] == 1
    for layer in range(3):
        reader.layer(layer)
    assert memory.open("k1", FP) is None           # promoted only once read whole
    reader.layer(3)
    assert _same(TieredStore([memory]).get("k1", FP), entry)
    assert _same(TieredStore([disk]).get("k1", FP), entry)
    assert store.open("k1", FP).tier == "memory"

    memory.clear(), disk.clear()                    # read in groups, as the loader reads, it is promoted too
    reader = store.open("k1", FP)
    reader.layer(1)
    k, _ = reader.layers(0, 2)
    assert torch.equal(k, entry.k[0:2]) and memory.open("k1", FP) is None
    reader.layers(2, 4)
    assert _same(TieredStore([memory]).get("k1", FP), entry) and _same(TieredStore([disk]).get("k1", FP), entry)


def test_memory_tier_is_lru_bounded_in_bytes():
    size = _entry().nbytes
    memory = MemoryTier(max_bytes=int(2.5 * size))
    for i in range(3):
        memory.put(f"k{i}", FP, _entry(i))
        if i == 1:
            memory.open("k0", FP)                   # k0 becomes the most recently used
    assert memory.open("k1", FP) is None and memory.open("k0", FP) is not None
    assert memory.stats()["bytes"] <= memory.max_bytes


# -- disk faults ----------------------------------------------------------------------------------------------------
def _layer_file(root: Path, key: str, layer: int) -> Path:
    return root / "entries" / key[:2] / key / f"layer.{layer}.safetensors"


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete_part"])
def test_damaged_disk_entry_is_detected(tmp_path, damage):
    disk = DiskTier(tmp_path / "kv")
    key = "ab" + "0" * 38
    disk.put(key, FP, _entry())
    part = _layer_file(tmp_path / "kv", key, 2)
    blob = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(blob[: len(blob) // 2])
    elif damage == "bitflip":
        flipped = bytearray(blob)
        flipped[-5] ^= 0x10
        part.write_bytes(bytes(flipped))
    else:
        part.unlink()
    reader = disk.open(key, FP)
    reader.layer(1)                                 # intact parts still read
    with pytest.raises(CorruptEntry):
        reader.layer(2)


def test_disk_cap_evicts_least_recently_used(tmp_path):
    probe = DiskTier(tmp_path / "probe")
    probe.put("x" * 40, FP, _entry())
    size = probe.stats()["bytes"]
    disk = DiskTier(tmp_path / "kv", max_bytes=int(2.5 * size))
    disk.put("a" * 40, FP, _entry(1))
    disk.put("b" * 40, FP, _entry(2))
    disk.open("a" * 40, FP)                        # a is now more recent than b
    disk.put("c" * 40, FP, _entry(3))
    assert disk.open("b" * 40, FP) is None
    assert disk.open("a" * 40, FP) is not None and disk.open("c" * 40, FP) is not None
    assert disk.stats()["bytes"] <= disk.max_bytes
    # the cap and the order survive a restart
    again = DiskTier(tmp_path / "kv", max_bytes=int(2.5 * size))
    assert again.stats()["entries"] == 2


def test_disk_full_evicts_then_gives_up_quietly(tmp_path, monkeypatch, caplog):
    disk = DiskTier(tmp_path / "kv")
    for i in range(4):
        disk.put(f"{i}" * 40, FP, _entry(i))
    real_write, calls = disk_module._write_file, {"n": 0}

    def full_once(path, blob):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, blob)
    monkeypatch.setattr(disk_module, "_write_file", full_once)
    disk.put("e" * 40, FP, _entry(9))
    assert disk.open("e" * 40, FP) is not None     # written after making room
    assert disk.stats()["entries"] < 5             # by evicting older entries

    monkeypatch.setattr(disk_module, "_write_file", lambda p, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with caplog.at_level(logging.WARNING, logger="qcfuse.cache"):
        disk.put("f" * 40, FP, _entry(10))         # no exception
    assert "full" in caplog.text and disk.open("f" * 40, FP) is None
    assert not any((tmp_path / "kv" / "tmp").iterdir())


WRITER = textwrap.dedent("""
    import sys, time, torch
    from qcfuse.cache import disk as d
    from qcfuse.cache.kv import ChunkKV
    real = d._write_file
    def slow(path, blob):
        real(path, blob)
        time.sleep(float(sys.argv[3]))
    d._write_file = slow
    print("writing", flush=True)
    e = ChunkKV(torch.ones(8, 2, 32, 8), torch.ones(8, 2, 32, 8), {})
    d.DiskTier(sys.argv[1]).put(sys.argv[2], "fp", e)
    print("done", flush=True)
""")


def test_writer_killed_mid_write_leaves_no_entry(tmp_path):
    root, key = tmp_path / "kv", "k" * 40
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, "0.3"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 30
    while not any((root / "tmp").glob(f"{key}.*/layer.0.safetensors")):   # mid-write for sure
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert DiskTier(root).open(key, "fp") is None  # nothing visible ...
    assert not any((root / "tmp").iterdir())       # ... and the leftovers are swept at start


def test_two_writers_same_key_leave_one_clean_entry(tmp_path):
    root, key = tmp_path / "kv", "k" * 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, "0.02"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out
    disk = DiskTier(root)
    reader = disk.open(key, "fp")
    assert all(torch.equal(reader.layer(l)[0], torch.ones(2, 32, 8)) for l in range(8))
    assert disk.stats()["entries"] == 1 and not any((root / "tmp").iterdir())


# -- Redis down -----------------------------------------------------------------------------------------------------
def test_redis_unreachable_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qcfuse.cache"):
        store = open_store(cache_dir=str(tmp_path / "kv"), redis_url=f"redis://127.0.0.1:{free_port()}/0")
        store.put("k1", FP, _entry())               # no exception
        assert store.open("k1", FP).tier == "memory"
        store.tiers[0].clear()
        assert store.open("k1", FP).tier == "disk"
        assert store.open("k2", FP) is None
    assert "unreachable" in caplog.text
    assert sum("unreachable" in r.message for r in caplog.records) == 1   # warned once, not per call


def test_redis_killed_mid_read_raises_unavailable():
    port = free_port()
    proc = start_redis(port)
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    tier.put("k1", FP, _entry())
    reader = tier.open("k1", FP)
    reader.layer(0)
    proc.kill()
    proc.wait()
    with pytest.raises(TierUnavailable):
        reader.layer(1)
    with pytest.raises(TierUnavailable):        # marked down: no new connection attempts for a while
        tier.open("k1", FP)


# -- the engine over the store: faults never change the answer ------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smollm2):
    engine = FusionEngine(smollm2)
    layout = engine.layout(DOCS, QUESTION)
    return engine.generate_layout(layout, make_selector("qcfuse", 0.3), 8)


def _run(engine, method="qcfuse"):
    return engine.generate_layout(engine.layout(DOCS, QUESTION), make_selector(method, 0.3), 8)


def _recomputed_in(gen, engine, chunk: int) -> int:
    """How many of the recomputed positions fall inside one chunk of the request's prompt."""
    start, end = engine.layout(DOCS, QUESTION).chunk_spans()[chunk]
    return int(((gen.recomputed >= start) & (gen.recomputed < end)).sum())


def _same_result(a, b) -> bool:
    return a.token_ids == b.token_ids and torch.allclose(a.first_logits, b.first_logits, atol=1e-5)


def test_disk_cache_survives_restart_and_serves_same_answer(smollm2, reference, tmp_path):
    first = FusionEngine(smollm2, store=open_store(cache_dir=str(tmp_path / "kv")))
    assert first.prepare(DOCS) == len(DOCS) + 1
    second = FusionEngine(smollm2, store=open_store(cache_dir=str(tmp_path / "kv")))   # a new process's view
    assert second.prepare(DOCS) == 0
    gen = _run(second)
    assert gen.stats["hits_by_tier"] == {"disk": 3} and gen.stats["cache_misses"] == 0
    assert gen.stats["bytes_loaded"] > 0
    assert _same_result(gen, reference)
    assert _run(second).stats["hits_by_tier"] == {"memory": 3}        # promoted after the first read


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_entry_is_recomputed_with_a_warning(smollm2, reference, tmp_path, caplog, damage):
    root = tmp_path / "kv"
    FusionEngine(smollm2, store=open_store(cache_dir=str(root))).prepare(DOCS)
    engine = FusionEngine(smollm2, store=open_store(cache_dir=str(root)))
    key = engine._key(engine.layout(DOCS, QUESTION).chunks[1])
    part = _layer_file(root, key, 17)
    blob = bytearray(part.read_bytes())
    if damage == "bitflip":
        blob[len(blob) // 2] ^= 0x01
    else:
        del blob[len(blob) - 100:]
    part.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="qcfuse.cache"):
        gen = _run(engine)
    assert _same_result(gen, reference)
    assert gen.stats["chunks_recomputed"] == 1
    assert "dropping cache entry" in caplog.text
    # the broken chunk was recomputed: a miss and a corrupt entry, not a hit (and its tokens are not cached)
    stats = gen.stats
    assert (stats["cache_hits"], stats["cache_misses"], stats["cache_corrupt"]) == (2, 1, 1)
    assert stats["hits_by_tier"] == {"disk": 2}
    broken = len(engine.layout(DOCS, QUESTION).chunks[1])
    assert stats["cached_tokens"] == stats["prompt_tokens"] - stats["suffix_tokens"] - broken \
        - stats["recomputed_tokens"] + _recomputed_in(gen, engine, 1)
    assert engine.store.corrupt == 1 and engine.store.hits["disk"] == 3 and engine.store.misses == 1
    fresh = DiskTier(root).open(key, smollm2.fingerprint)         # removed, then written again, clean
    assert all(fresh.layer(l) is not None for l in range(fresh.n_layers))


def test_foreign_model_entry_is_recomputed(smollm2, reference, tmp_path, caplog):
    """An entry renamed under this model's key but written by another model is caught by the fingerprint."""
    root = tmp_path / "kv"
    engine = FusionEngine(smollm2, store=open_store(cache_dir=str(root)))
    ids = engine.layout(DOCS, QUESTION).chunks[0]
    DiskTier(root).put(engine._key(ids), "some other model", _entry())
    with caplog.at_level(logging.WARNING, logger="qcfuse.cache"):
        gen = _run(engine)
    assert "another model" in caplog.text
    assert gen.stats["cache_misses"] == 3 and _same_result(gen, reference)
    assert gen.stats["cache_corrupt"] == 1 and engine.store.corrupt == 1


def test_redis_dies_mid_request(smollm2, reference, caplog):
    port = free_port()
    proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    FusionEngine(smollm2, store=open_store(redis_url=url)).prepare(DOCS)
    engine = FusionEngine(smollm2, store=open_store(redis_url=url), background_loading=False)
    real_lookup = engine.store.lookup

    def lookup_then_kill(key, fingerprint):     # the entry is found in Redis, then Redis goes away
        found = real_lookup(key, fingerprint)
        if proc.poll() is None and found.reader is not None and found.reader.tier == "redis":
            proc.kill()
            proc.wait()
        return found
    engine.store.lookup = lookup_then_kill
    with caplog.at_level(logging.WARNING, logger="qcfuse.cache"):
        gen = _run(engine)
    assert proc.poll() is not None
    assert _same_result(gen, reference)
    assert gen.stats["chunks_recomputed"] >= 1 and "went away" in caplog.text
    # nothing came whole from a cache: every chunk is a miss, none of them corrupt (the tier went away)
    assert (gen.stats["cache_hits"], gen.stats["cache_misses"], gen.stats["cache_corrupt"]) == (0, 3, 0)
    assert gen.stats["cached_tokens"] == 0 and engine.store.hits["redis"] == 0
    again = _run(engine)                         # Redis still down: local tiers serve
    assert _same_result(again, reference)


# -- pipelining -----------------------------------------------------------------------------------------------------
class _GatedTier(MemoryTier):
    """A memory tier whose last layer cannot be read until `gate` is set (a very slow last read)."""
    name = "gated"

    def __init__(self, last_layer: int):
        super().__init__()
        self.last_layer, self.gate = last_layer, threading.Event()

    def open(self, key, fingerprint):
        reader = super().open(key, fingerprint)
        if reader is None:
            return None
        read, read_group, tier = reader.layer, reader.layers, self

        def gated_layer(layer):
            if layer == tier.last_layer:
                tier.gate.wait(timeout=60)
            return read(layer)

        def gated_layers(start, stop):          # the background loader reads a few layers at a time
            if start <= tier.last_layer < stop:
                tier.gate.wait(timeout=60)
            return read_group(start, stop)
        reader.layer, reader.layers, reader.tier = gated_layer, gated_layers, "gated"
        return reader


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("n_layers", [4, 7, 9])
def test_loader_reads_groups_of_layers(tier, n_layers, background):
    """The loader reads each chunk GROUP_LAYERS layers at a time (fewer host calls beside a selector that
    launches work), from any tier, in the background or not, and hands out exactly the stored layers, one by
    one or as the group they came in (which the fuse loop places at once), the last group short or not."""
    from qcfuse.cache import loader as loader_module
    entries = [ChunkKV(torch.randn(n_layers, 2, n, 8), torch.randn(n_layers, 2, n, 8)) for n in (5, 3, 6)]
    calls = []
    for i, e in enumerate(entries):
        tier.put(f"key{i}", FP, e)
    sources = []
    for i in range(len(entries)):
        reader = tier.open(f"key{i}", FP)
        read_group = reader.layers

        def counted(start, stop, read_group=read_group):
            calls.append((start, stop))
            return read_group(start, stop)
        reader.layers = counted
        sources.append(reader)
    loader = loader_module.LayerLoader(sources, n_layers, background=background)
    for layer in reversed(range(n_layers)):
        k, v = loader.layer(layer)
        assert torch.equal(k, torch.cat([e.k[layer] for e in entries], dim=1))
        assert torch.equal(v, torch.cat([e.v[layer] for e in entries], dim=1))
    group = loader_module.GROUP_LAYERS
    starts = list(range(0, n_layers, group))
    for start in starts:
        span = loader.span(start + 1 if start + 1 < n_layers else start)
        assert span == range(start, min(n_layers, start + group))
        k, v = loader.layers(span)
        assert torch.equal(k, torch.cat([e.k[span.start:span.stop] for e in entries], dim=2))
        assert torch.equal(v, torch.cat([e.v[span.start:span.stop] for e in entries], dim=2))
    with pytest.raises(ValueError):
        loader.layers(range(0, n_layers + 1))                       # not one group
    loader.close()
    assert sorted(set(calls)) == [(a, min(n_layers, a + group)) for a in starts]
    assert len(calls) == len(entries) * len(starts)


def test_qcfuse_selects_while_layers_still_load(smollm2, reference):
    """QCFuse's selection needs the query cache only: it finishes while the last layer is still unreadable,
    and meanwhile the loader has already brought layers in the background (loading overlaps selection)."""
    n_layers = smollm2.transformer.n_layers
    tier = _GatedTier(last_layer=n_layers - 1)
    engine = FusionEngine(smollm2, store=TieredStore([tier]))
    tier.gate.set()
    engine.prepare(DOCS)
    tier.gate.clear()
    seen = {}

    class Watching(type(make_selector("qcfuse"))):
        def select(self, inputs):
            out = super().select(inputs)
            loader = inputs.reused.loader
            deadline = time.monotonic() + 10
            while not loader.ready(0) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["first"], seen["last"] = loader.ready(0), loader.ready(n_layers - 1)
            tier.gate.set()
            return out
    gen = engine.generate_layout(engine.layout(DOCS, QUESTION), Watching(0.3), 8)
    assert seen == {"first": True, "last": False}
    assert _same_result(gen, reference)

    serial = FusionEngine(smollm2, store=engine.store, background_loading=False)
    gen_serial = serial.generate_layout(serial.layout(DOCS, QUESTION), make_selector("qcfuse", 0.3), 8)
    assert _same_result(gen_serial, reference)
    assert gen_serial.stats["io_wait_s"] > 0 and gen_serial.stats["bytes_loaded"] > 0


def test_loader_from_memory_starts_at_the_first_full_layer_read(smollm2, reference, monkeypatch):
    """From memory, a background loader does not stream while QCFuse selects from its query cache (its host work
    would slow the selection, and the copy has slack); ProphetKV's selection reads full layers and starts it."""
    engine = FusionEngine(smollm2)
    engine.prepare(DOCS)
    monkeypatch.setattr(engine, "_background", lambda sources: True)      # as on a GPU
    seen = {}

    def watching(method):
        class Watching(type(make_selector(method))):
            def select(self, inputs):
                seen[f"{method} before"] = inputs.reused.loader._thread is not None
                out = super().select(inputs)
                seen[f"{method} after"] = inputs.reused.loader._thread is not None
                return out
        return Watching(0.3)
    for method in ("qcfuse", "prophetkv"):
        gen = engine.generate_layout(engine.layout(DOCS, QUESTION), watching(method), 8)
        assert gen.stats["bytes_loaded"] > 0
        if method == "qcfuse":
            assert _same_result(gen, reference)
    assert seen == {"qcfuse before": False, "qcfuse after": False, "prophetkv before": False,
                    "prophetkv after": True}


# -- the command line -----------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qcfuse", *args], capture_output=True, text=True, timeout=600)


def test_prepare_then_stats_then_clear(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(DOCS):
        (docs / f"{i}.txt").write_text(text)
    cache = str(tmp_path / "kv")
    first = _cli("prepare", "--documents", str(docs), "--cache_dir", cache)
    assert first.returncode == 0, first.stderr
    assert "4 caches computed, 0 already stored" in first.stdout      # 3 documents + the prompt prefix
    again = _cli("prepare", "--documents", str(docs), "--cache_dir", cache)
    assert "0 caches computed, 4 already stored" in again.stdout
    stats = _cli("cache", "stats", "--cache_dir", cache, "--json")
    import json
    assert [s["entries"] for s in json.loads(stats.stdout)] == [4]
    cleared = _cli("cache", "clear", "--cache_dir", cache, "--json")
    assert json.loads(cleared.stdout) == {"disk": 4}
    assert json.loads(_cli("cache", "stats", "--cache_dir", cache, "--json").stdout)[0]["entries"] == 0


@pytest.mark.parametrize("args, message", [
    (["prepare", "--documents", "nowhere", "--cache_dir", "x"], "documents not found"),
    (["prepare", "--documents", "."], "needs --cache_dir"),
    (["cache", "stats"], "name a tier"),
    (["cache", "stats", "--redis_url", "http://nope"], "bad --redis_url"),
])
def test_cache_cli_errors_are_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
