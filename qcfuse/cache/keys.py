"""Content addresses: a cache entry is valid only for the same model, tokenizer and token ids."""
from __future__ import annotations

import hashlib
import json

import torch


def model_fingerprint(hf_model, tokenizer=None) -> str:
    """Hash of architecture, dtype, every weight's bytes, and the tokenizer's vocabulary."""
    h = hashlib.blake2b(digest_size=16)
    cfg = hf_model.config.to_dict()
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(hf_model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def chunk_key(fingerprint: str, token_ids) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(fingerprint.encode())
    h.update(torch.as_tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
