"""Bytes on disk and in Redis: one safetensors blob per part, each carrying its own checksum.

An entry has parts: "meta" (JSON: who wrote it and what it holds), "query" (the selectors' small extras, read
first) and "layer.{l}" (K and V of one layer, so a reader fetches layer l alone). Every blob is verified when
read; anything that does not verify raises CorruptEntry and the store treats the entry as absent.
"""
from __future__ import annotations

import json
import math
import struct
import warnings

import safetensors.torch
import torch
import xxhash

from .kv import ChunkKV

FORMAT_VERSION = 1
_PLACEHOLDER = "0" * 16                   # an xxh3-64 digest in hex is 16 characters
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CorruptEntry(Exception):
    """A stored part is truncated, altered, foreign or missing: recompute the chunk."""


def layer_part(layer: int) -> str:
    return f"layer.{layer}"


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes whose header metadata holds the xxh3 checksum of the data section."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    # save once with a placeholder of the digest's length, then fill the digest into the header in place
    blob = bytearray(safetensors.torch.save(tensors, metadata={"xxh3": _PLACEHOLDER}))
    digest = xxhash.xxh3_64_hexdigest(_data_section(blob)).encode()
    (n,) = struct.unpack("<Q", blob[:8])
    at = blob.index(_PLACEHOLDER.encode(), 8, 8 + n)
    blob[at:at + len(digest)] = digest
    return bytes(blob)


def decode_tensors(blob: bytes | memoryview | None) -> dict[str, torch.Tensor]:
    if blob is None:
        raise CorruptEntry("part missing")
    try:
        _verified_header(blob)
        return safetensors.torch.load(bytes(blob))
    except CorruptEntry:
        raise
    except Exception as exc:   # truncated or garbled header: safetensors/json/struct errors
        raise CorruptEntry(f"unreadable part ({type(exc).__name__})") from None


def _verified_header(blob) -> dict:
    header = _header(blob)
    expected = header.get("__metadata__", {}).get("xxh3")
    if expected is None or xxhash.xxh3_64_hexdigest(_data_section(blob)) != expected:
        raise CorruptEntry("checksum mismatch")
    return header


def encode_meta(key: str, fingerprint: str, entry: ChunkKV) -> bytes:
    body = {"version": FORMAT_VERSION, "key": key, "fingerprint": fingerprint, "n_tokens": entry.n_tokens,
            "n_layers": entry.k.shape[0], "dtype": str(entry.k.dtype).removeprefix("torch."),
            "nbytes": entry.nbytes}
    text = json.dumps(body, sort_keys=True)
    return json.dumps({"body": body, "xxh3": xxhash.xxh3_64_hexdigest(text.encode())}).encode()


def decode_meta(blob: bytes | None, key: str, fingerprint: str | None = None) -> dict:
    """The entry's description, checked against the key and model that ask for it."""
    if blob is None:
        raise CorruptEntry("meta missing")
    try:
        wrapper = json.loads(blob)
        body = wrapper["body"]
        ok = xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode()) == wrapper["xxh3"]
    except Exception:
        raise CorruptEntry("unreadable meta") from None
    if not ok:
        raise CorruptEntry("meta checksum mismatch")
    if body.get("version") != FORMAT_VERSION:
        raise CorruptEntry(f"format version {body.get('version')} (expected {FORMAT_VERSION})")
    if body["key"] != key:
        raise CorruptEntry("entry stored under another key")
    if fingerprint is not None and body["fingerprint"] != fingerprint:
        raise CorruptEntry("entry written by another model")
    return body


def encode_entry(key: str, fingerprint: str, entry: ChunkKV) -> dict[str, bytes]:
    """All parts of an entry, ready to write."""
    parts = {"meta": encode_meta(key, fingerprint, entry), "query": encode_tensors(entry.extras)}
    for layer in range(entry.k.shape[0]):
        parts[layer_part(layer)] = encode_tensors({"k": entry.k[layer], "v": entry.v[layer]})
    return parts


def decode_layer(blob, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = decode_tensors(blob)
    k, v = tensors.get("k"), tensors.get("v")
    if k is None or v is None or k.shape[1] != n_tokens or v.shape[1] != n_tokens:
        raise CorruptEntry("layer shape does not match the entry")
    return k, v


def decode_layers(blobs: list, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Several layer parts straight into one [G, Hkv, n, D] tensor each for K and V: each part's data is
    copied once, from its bytes into its slice (decode_layer, then a stack, would copy it twice)."""
    try:
        parts = [(_verified_header(blob), _data_section(blob)) for blob in blobs]
        first = parts[0][0]["k"]                 # checked against its bytes before anything is allocated
        shape, dtype, (start, stop) = [int(x) for x in first["shape"]], _DTYPES[first["dtype"]], first["data_offsets"]
        if len(shape) != 3 or shape[1] != n_tokens or stop - start != math.prod(shape) * dtype.itemsize:
            raise CorruptEntry("layer shape does not match the entry")
        k = torch.empty((len(parts), *shape), dtype=dtype)
        v = torch.empty_like(k)
        for i, (header, data) in enumerate(parts):
            _copy_into(k[i], header["k"], data)
            _copy_into(v[i], header["v"], data)
        return k, v
    except CorruptEntry:
        raise
    except Exception as exc:   # a garbled header: missing names, unknown dtypes, bad offsets
        raise CorruptEntry(f"unreadable part ({type(exc).__name__})") from None


def _copy_into(out: torch.Tensor, info: dict, data) -> None:
    """One safetensors tensor of a verified part into `out`, which it must match exactly."""
    start, stop = info["data_offsets"]
    if (_DTYPES.get(info["dtype"]) != out.dtype or list(info["shape"]) != list(out.shape)
            or stop - start != out.numel() * out.element_size() or not 0 <= start <= stop <= len(data)):
        raise CorruptEntry("layer shape does not match the entry")
    if out.numel():
        with warnings.catch_warnings():          # a read-only view of the bytes, copied from at once
            warnings.simplefilter("ignore", UserWarning)
            out.copy_(torch.frombuffer(data, dtype=out.dtype, count=out.numel(), offset=start).view(out.shape))


def _header(blob) -> dict:
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > len(blob) - 8:
        raise CorruptEntry("truncated header")
    return json.loads(bytes(blob[8:8 + n]))


def _data_section(blob) -> bytes | memoryview:
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    return memoryview(blob)[8 + n:]
