"""FusionEngine: documents + question in, answer and per-request stats out.

Offline, `prepare` prefills each chunk on its own (positions from 0) and stores its pre-RoPE K/V under a
content key. Online, `generate` fetches the prefix and chunk caches (computing any miss), lets the selector
pick tokens, runs the fuse loop, and decodes greedily from the fused cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cache.keys import chunk_key
from .cache.kv import ChunkKV
from .cache.store import KVStore, MemoryStore
from .errors import QcfuseError
from .fusion import SELECTORS, ReusedKV, Selector, make_selector
from .fusion.fuse import fuse, greedy_decode
from .model.loader import LoadedModel
from .prompt import PromptLayout, build_layout


@dataclass
class Generation:
    answer: str
    token_ids: list[int]
    first_logits: torch.Tensor = field(repr=False)
    stats: dict
    recomputed: torch.Tensor = field(repr=False, default=None)   # document positions recomputed


class FusionEngine:
    def __init__(self, model: LoadedModel, store: KVStore | None = None):
        self.model = model
        self.store = store if store is not None else MemoryStore()
        _ = model.fingerprint          # hash the weights now, not inside the first request's TTFT

    def warmup(self) -> None:
        """One tiny prefill so one-time kernel set-up stays out of the first measured TTFT."""
        self.model.transformer.prefill(torch.tensor(self.model.tokenizer("warm up").input_ids[:8]))

    # -- offline ------------------------------------------------------------------------------------------
    def layout(self, documents: list[str], question: str) -> PromptLayout:
        return build_layout(self.model.tokenizer, documents, question)

    def prepare(self, documents: list[str], progress: bool = False) -> int:
        """Precompute and store the cache of every chunk (and the prompt prefix) not yet stored; returns how
        many were computed."""
        from tqdm import tqdm
        layout = self.layout(documents, "?")
        pieces = [ids for ids in [layout.prefix, *layout.chunks] if ids]
        bar = tqdm(pieces, desc="preparing chunk caches", unit="chunk", disable=not progress, leave=False)
        return sum(not self._entry(ids)[1] for ids in bar)

    def _entry(self, ids: list[int]) -> tuple[ChunkKV, bool]:
        key = chunk_key(self.model.fingerprint, ids)
        entry = self.store.get(key)
        if entry is not None:
            return entry, True
        k, v, _ = self.model.transformer.prefill(torch.tensor(ids, dtype=torch.long))
        entry = ChunkKV(k, v)
        for selector in SELECTORS.values():
            selector.offline(self.model, ids, entry)
        self.store.put(key, entry)
        return entry, False

    def check_fits(self, layout: PromptLayout, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise QcfuseError("max_new_tokens must be at least 1")
        window = self.model.transformer.max_positions
        if layout.n_tokens + max_new_tokens > window:
            raise QcfuseError(f"prompt of {layout.n_tokens} tokens + {max_new_tokens} new tokens exceeds the "
                              f"model's window of {window} tokens")

    # -- online -------------------------------------------------------------------------------------------
    def generate(self, documents: list[str], question: str, method: str = "reuse", ratio: float = 0.15,
                 max_new_tokens: int = 32, **selector_options) -> Generation:
        t0 = time.perf_counter()
        layout = self.layout(documents, question)
        return self.generate_layout(layout, make_selector(method, ratio, **selector_options), max_new_tokens, t0)

    def generate_layout(self, layout: PromptLayout, selector: Selector, max_new_tokens: int = 32,
                        t0: float | None = None) -> Generation:
        t0 = time.perf_counter() if t0 is None else t0
        model = self.model.transformer
        self.check_fits(layout, max_new_tokens)
        hits = misses = 0
        reused = None
        if selector.uses_cache:
            pieces = []
            if layout.prefix:
                pieces.append(self._entry(layout.prefix)[0])   # shared by every request: not counted
            for ids in layout.chunks:
                entry, hit = self._entry(ids)
                pieces.append(entry)
                hits, misses = hits + hit, misses + (not hit)
            reused = ReusedKV(pieces, prefix_len=len(layout.prefix))
        out = fuse(model, layout, reused, selector, capacity=layout.n_tokens + max_new_tokens)
        ttft = time.perf_counter() - t0

        t1 = time.perf_counter()
        tokens = greedy_decode(model, out.buffer, out.logits, layout.n_tokens, max_new_tokens, self.model.stop_ids)
        decode_s = time.perf_counter() - t1
        text_ids = [t for t in tokens if t not in self.model.stop_ids]
        answer = self.model.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        stats = {
            "method": selector.name,
            "ratio": selector.ratio,
            "ttft_s": ttft,
            "selection_s": out.selection_s,
            "recomputed_tokens": int(out.recomputed.numel()),
            "context_tokens": layout.n_doc_tokens,
            "prompt_tokens": layout.n_tokens,
            "suffix_tokens": len(layout.suffix),
            "cache_hits": hits,
            "cache_misses": misses,
            "new_tokens": len(tokens),
            "decode_s": decode_s,
        }
        return Generation(answer, tokens, out.logits, stats, out.recomputed)
