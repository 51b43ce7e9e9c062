"""FusionEngine: documents + question in, answer and per-request stats out.

Offline, `prepare` prefills each chunk on its own (positions from 0) and stores its pre-RoPE K/V under a
content key. Online, `generate` fetches the prefix and chunk caches (computing any miss), lets the selector
pick tokens, runs the fuse loop, and decodes greedily from the fused cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from collections import Counter

from .cache.keys import chunk_key
from .cache.kv import ChunkKV
from .cache.loader import ChunkSource, LayerLoader
from .cache.store import MemoryReader, TieredStore
from .errors import QcfuseError
from .fusion import SELECTORS, ReusedKV, Selector, make_selector
from .fusion.fuse import FuseResult, fuse, greedy_decode, synchronize
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
    def __init__(self, model: LoadedModel, store: TieredStore | None = None, background_loading: bool = True):
        self.model = model
        self.store = store if store is not None else TieredStore()
        self.background_loading = background_loading     # False: read each layer only when compute needs it
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
        return self.prepare_layout(self.layout(documents, "?"), progress)

    def prepare_layout(self, layout: PromptLayout, progress: bool = False) -> int:
        from tqdm import tqdm
        pieces = [ids for ids in [layout.prefix, *layout.chunks] if ids]
        bar = tqdm(pieces, desc="preparing chunk caches", unit="chunk", disable=not progress, leave=False)
        computed = 0
        for ids in bar:
            if not self.store.contains(self._key(ids), self.model.fingerprint):
                self._compute_and_store(ids)
                computed += 1
        return computed

    def _key(self, ids: list[int]) -> str:
        return chunk_key(self.model.fingerprint, ids)

    def _compute_and_store(self, ids: list[int]) -> ChunkKV:
        """Prefill a chunk on its own (positions from 0), add every selector's offline extras, store it."""
        k, v, _ = self.model.transformer.prefill(torch.tensor(ids, dtype=torch.long))
        entry = ChunkKV(k, v)
        for selector in SELECTORS.values():
            selector.offline(self.model, ids, entry)
        self.store.put(self._key(ids), self.model.fingerprint, entry)
        return entry

    def _source(self, ids: list[int]) -> tuple[ChunkSource, bool]:
        """A chunk's cache as the fuse loop reads it, from whichever tier has it (computed on a miss)."""
        key = self._key(ids)
        reader = self.store.open(key, self.model.fingerprint)
        hit = reader is not None
        if not hit:
            reader = MemoryReader(self._compute_and_store(ids), tier="computed")
        return ChunkSource(reader, recompute=lambda: self._compute_and_store(ids),
                           on_corrupt=lambda why: self.store.discard(key, why)), hit

    def _entry(self, ids: list[int]) -> tuple[ChunkKV, bool]:
        """A chunk's whole cache at once (tools and tests; requests stream layers instead)."""
        entry = self.store.get(self._key(ids), self.model.fingerprint)
        if entry is not None:
            return entry, True
        return self._compute_and_store(ids), False

    def _background(self, sources: list) -> bool:
        """Read layers ahead in a thread when that overlaps something: a copy engine (CUDA) or I/O (disk,
        Redis). On the CPU with every chunk already in memory a read is a memcpy on the same cores as compute,
        and a second thread running parallel ops only oversubscribes them (QCFuse's selection 67-83 ms in the
        foreground against 144-182 ms beside a background reader, SmolLM2 at 4K on 2 cores:
        scripts/time_requests.py)."""
        if not self.background_loading:
            return False
        in_memory = {"memory", "computed", "recomputed"}
        return self.model.transformer.device.type == "cuda" or any(s.tier not in in_memory for s in sources)

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
        out, stats = self.prefill(layout, selector, max_new_tokens, t0)
        t1 = time.perf_counter()
        tokens = greedy_decode(self.model.transformer, out.buffer, out.logits, layout.n_tokens, max_new_tokens,
                               self.model.stop_ids)
        stats.update(new_tokens=len(tokens), decode_s=time.perf_counter() - t1)
        text_ids = [t for t in tokens if t not in self.model.stop_ids]
        answer = self.model.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        return Generation(answer, tokens, out.logits, stats, out.recomputed)

    def prefill(self, layout: PromptLayout, selector: Selector, max_new_tokens: int = 32,
                t0: float | None = None) -> tuple[FuseResult, dict]:
        """Everything up to the first token: the fused cache (room for `max_new_tokens` more), the first
        logits, and the request's stats. Streaming servers decode from here one token at a time."""
        t0 = time.perf_counter() if t0 is None else t0
        model = self.model.transformer
        self.check_fits(layout, max_new_tokens)
        hits, misses, by_tier = 0, 0, Counter()
        reused = loader = None
        sources = []
        if selector.uses_cache:
            if layout.prefix:
                sources.append(self._source(layout.prefix)[0])   # shared by every request: not counted
            for ids in layout.chunks:
                source, hit = self._source(ids)
                sources.append(source)
                hits, misses = hits + hit, misses + (not hit)
                if hit:
                    by_tier[source.tier] += 1
            loader = LayerLoader(sources, model.n_layers, model.device, background=self._background(sources))
            reused = ReusedKV(sources, prefix_len=len(layout.prefix), loader=loader)
        try:
            out = fuse(model, layout, reused, selector, capacity=layout.n_tokens + max_new_tokens)
            synchronize(model.device)
        finally:
            if loader is not None:
                loader.close()
        stats = {
            "method": selector.name,
            "ratio": selector.ratio,
            "ttft_s": time.perf_counter() - t0,
            "selection_s": out.selection_s,
            "recomputed_tokens": int(out.recomputed.numel()),
            "recomputed_share": int(out.recomputed.numel()) / max(1, layout.n_doc_tokens),   # what auto chose
            "context_tokens": layout.n_doc_tokens,
            "prompt_tokens": layout.n_tokens,
            "suffix_tokens": len(layout.suffix),
            "cache_hits": hits,
            "cache_misses": misses,
            "hits_by_tier": dict(by_tier),
            "bytes_loaded": loader.bytes_loaded if loader else 0,
            "io_wait_s": loader.io_wait_s if loader else 0.0,
            "chunks_recomputed": sum(s.recomputed for s in sources),
            "new_tokens": 0,
            "decode_s": 0.0,
        }
        return out, stats
