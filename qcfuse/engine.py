"""FusionEngine: documents + question in, answer and per-request stats out.

Offline, `prepare` prefills each chunk on its own (positions from 0) and stores its pre-RoPE K/V under a
content key. Online, `generate` fetches the prefix and chunk caches (computing any miss), lets the selector
pick tokens, runs the fuse loop (again with more tokens while ratio auto's margin rule finds the first token
unsure; a pass of ratio auto that recomputes every document token is a plain full prefill), and decodes from
the fused cache (greedily unless sampling says otherwise, qcfuse/sampling.py).

Cache accounting, per request and for document chunks: a hit is a chunk served whole from the store; a chunk
computed in the request is a miss, including one whose entry turned out broken (also counted in
`cache_corrupt`) or whose tier went away mid-read. `cached_tokens` counts the prompt tokens whose K/V came
from a stored entry and were not recomputed.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .cache.keys import chunk_key
from .cache.kv import ChunkKV
from .cache.loader import ChunkSource, LayerLoader
from .cache.store import MemoryReader, TieredStore
from .decoding import Answers
from .errors import QcfuseError
from .fusion import DEFAULT_METHOD, DEFAULT_RATIO, SELECTORS, ReusedKV, Selector, graphs, make_selector
from .fusion.fuse import FuseResult, fuse, synchronize
from .model.loader import LoadedModel
from .prompt import PromptLayout, build_layout
from .sampling import Sampler, SamplingParams, TokenLogprob


@dataclass
class Choice:
    text: str
    token_ids: list[int]
    finish_reason: str                            # "stop" or "length"
    logprobs: list[TokenLogprob] | None = None    # when sampling asked for them


@dataclass
class Generation:
    answer: str
    token_ids: list[int]
    first_logits: torch.Tensor = field(repr=False)
    stats: dict
    recomputed: torch.Tensor = field(repr=False, default=None)   # document positions recomputed
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] = field(default_factory=list)         # all n answers; the first is the one above


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

    def _source(self, ids: list[int]) -> _Piece:
        """A chunk's cache as the fuse loop reads it, from whichever tier has it (computed on a miss)."""
        key = self._key(ids)
        found = self.store.lookup(key, self.model.fingerprint)
        reader = found.reader
        if reader is None:
            reader = MemoryReader(self._compute_and_store(ids), tier="computed")
        source = ChunkSource(reader, recompute=lambda: self._compute_and_store(ids),
                             on_corrupt=lambda why: self.store.discard(key, why))
        return _Piece(source, found.reader is not None, found.broken)

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
        return self.model.transformer.device.type == "cuda" or not _in_memory(sources)

    def check_fits(self, layout: PromptLayout, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise QcfuseError("max_new_tokens must be at least 1")
        window = self.model.transformer.max_positions
        if layout.n_tokens + max_new_tokens > window:
            raise QcfuseError(f"prompt of {layout.n_tokens} tokens + {max_new_tokens} new tokens exceeds the "
                              f"model's window of {window} tokens")

    # -- online -------------------------------------------------------------------------------------------
    def generate(self, documents: list[str], question: str, method: str = DEFAULT_METHOD,
                 ratio: float = DEFAULT_RATIO, max_new_tokens: int = 32, sampling: SamplingParams | None = None,
                 **selector_options) -> Generation:
        """Answer `question` over `documents`. `sampling` (temperature, top_p, seed, stop, n, logprobs, ...)
        defaults to greedy decoding; `selector_options` go to the method (e.g. anchor_ratio=0.1)."""
        t0 = time.perf_counter()
        selector = make_selector(method, ratio, **selector_options)
        return self.generate_layout(self.layout(documents, question), selector, max_new_tokens, t0, sampling)

    def generate_layout(self, layout: PromptLayout, selector: Selector, max_new_tokens: int = 32,
                        t0: float | None = None, sampling: SamplingParams | None = None,
                        strip: bool = True) -> Generation:
        answers = self.start(layout, selector, max_new_tokens, sampling, t0, strip)
        decoded = [answers.next().run() for _ in range(answers.n)]
        choices = [Choice(d.text, d.token_ids, d.finish_reason, d.logprobs) for d in decoded]
        first = choices[0]
        return Generation(first.text, first.token_ids, answers.out.logits, answers.stats, answers.out.recomputed,
                          first.finish_reason, first.logprobs, choices)

    def start(self, layout: PromptLayout, selector: Selector, max_new_tokens: int = 32,
              sampling: SamplingParams | None = None, t0: float | None = None, strip: bool = True) -> Answers:
        """Prefill, then hand back the request's answers to decode (one at a time, or token by token).
        strip=False keeps the answers' surrounding whitespace (raw text completions)."""
        sampling = sampling if sampling is not None else SamplingParams()
        sampler = Sampler(sampling, self.model.transformer.vocab_size)       # bad options fail before prefill
        out, stats = self.prefill(layout, selector, max_new_tokens, t0)
        return Answers(self.model, out, stats, layout.n_tokens, max_new_tokens, sampling, sampler, strip)

    def prefill(self, layout: PromptLayout, selector: Selector, max_new_tokens: int = 32,
                t0: float | None = None, context_only: bool = False) -> tuple[FuseResult, dict]:
        """Everything up to the first token: the fused cache (room for `max_new_tokens` more), the first
        logits, and the request's stats (`start` decodes from here). context_only: the context's K/V only,
        for a caller that computes the question itself (the vLLM connector)."""
        t0 = time.perf_counter() if t0 is None else t0
        model = self.model.transformer
        self.check_fits(layout, max_new_tokens)
        pieces: list[_Piece] = []
        if selector.uses_cache and not selector.recomputes_everything(model, 0):     # else nothing is read
            if layout.prefix:
                pieces.append(self._source(layout.prefix))     # shared by every request: not a chunk
            pieces += [self._source(ids) for ids in layout.chunks]
        sources = [p.source for p in pieces]
        passes, recomputed_total, selection_s, waits = 0, 0, 0.0, []
        reuse: list[int] = []           # ratio auto's reuse check: reuse's first token, once it was asked for
        first: list[FuseResult] = []
        graph_runs = graphs.counts(model)

        def reuse_token() -> int:
            if not reuse:
                plain = first[0].reuse_logits
                if plain is None:      # not computed beside the first pass: a pass of its own
                    plain = self._fuse_pass(layout, sources, make_selector("reuse"), layout.n_tokens, False, 0,
                                            waits).logits
                reuse.append(int(plain.argmax()))
            return reuse[0]

        while True:     # one pass, unless ratio auto's margin rule finds the first token unsure and escalates
            everything = selector.recomputes_everything(model, passes)     # then a plain prefill: no reads
            out = self._fuse_pass(layout, [] if everything else sources,
                                  make_selector("fullcomp") if everything else selector,
                                  layout.n_tokens + max_new_tokens, context_only and selector.auto is None,
                                  passes, waits,
                                  with_reuse=passes == 0 and not everything and selector.checks_reuse(model))
            if not first:
                first.append(out)
            passes += 1
            recomputed_total += int(out.recomputed.numel())
            selection_s += out.selection_s
            if everything or selector.settled(model, out.logits, passes - 1, reuse_token):
                break
        io_wait_s = sum(waits)
        if context_only:
            out.logits = None
        for piece in pieces:
            if piece.found and piece.source.recomputed:
                self.store.unserved(piece.tier)
        chunks = pieces[1:] if layout.prefix and pieces else pieces
        served = [p for p in chunks if p.served]
        stats = {
            "method": selector.name,
            "ratio": selector.ratio,
            "ttft_s": time.perf_counter() - t0,
            "selection_s": selection_s,
            "recomputed_tokens": int(out.recomputed.numel()),     # in the cache the answer is decoded from
            "recomputed_share": int(out.recomputed.numel()) / max(1, layout.n_doc_tokens),   # what auto chose
            "auto_rule": selector.auto_rule(model),               # ratio auto: "margin" or "mass"
            "passes": passes,                                     # more than 1: auto's margin rule escalated
            "reuse_checked": bool(reuse),                         # auto's reuse check decided the first pass
            "recomputed_total_share": recomputed_total / max(1, layout.n_doc_tokens),   # over every pass
            "context_tokens": layout.n_doc_tokens,
            "prompt_tokens": layout.n_tokens,
            "suffix_tokens": len(layout.suffix),
            "cached_tokens": _cached_tokens(pieces, out.recomputed),
            "cache_hits": len(served),
            "cache_misses": len(chunks) - len(served),
            "cache_corrupt": sum(p.broken + p.source.corrupt for p in chunks),
            "hits_by_tier": dict(Counter(p.tier for p in served)),
            "bytes_loaded": sum(getattr(s, "bytes_read", 0) for s in sources),     # every pass's reads
            "io_wait_s": io_wait_s,
            "chunks_recomputed": sum(p.source.recomputed for p in pieces),
            # QCFuse's question pass on a GPU: how often it ran eagerly, was captured or replayed as a graph
            "question_graph": {how: n - graph_runs.get(how, 0) for how, n in graphs.counts(model).items()
                               if n > graph_runs.get(how, 0)},
            "new_tokens": 0,
            "decode_s": 0.0,
        }
        return out, stats

    def _fuse_pass(self, layout: PromptLayout, sources: list, selector: Selector, capacity: int,
                   context_only: bool, attempt: int, waits: list[float], with_reuse: bool = False) -> FuseResult:
        """One run of the fuse loop, each layer read anew from the chunk sources (appends its I/O wait)."""
        model = self.model.transformer
        reused = loader = None
        if selector.uses_cache:
            # from memory the copy has slack and its host work slows a selection that launches work: start it
            # at the first full-layer read; from disk or Redis the read is long: start it before selection
            loader = LayerLoader(sources, model.n_layers, model.device, background=self._background(sources),
                                 eager=not _in_memory(sources))
            reused = ReusedKV(sources, prefix_len=len(layout.prefix), loader=loader)
        try:
            out = fuse(model, layout, reused, selector, capacity=capacity, context_only=context_only,
                       attempt=attempt, with_reuse=with_reuse)
            synchronize(model.device)
        finally:
            if loader is not None:
                loader.close()
        waits.append(loader.io_wait_s if loader else 0.0)
        return out


@dataclass
class _Piece:
    """One cached piece of a request's prompt (its prefix or a chunk) and how the store answered for it."""
    source: ChunkSource
    found: bool              # the store had an entry (counted a hit when it was opened)
    broken: int = 0          # broken copies found and dropped while looking it up
    tier: str = ""

    def __post_init__(self):
        self.tier = self.source.tier

    @property
    def served(self) -> bool:
        """Read whole from the store: found, and not recomputed when a part failed mid-request."""
        return self.found and not self.source.recomputed


def _in_memory(sources: list) -> bool:
    """Every chunk is served from memory (host or GPU), none from a slow tier."""
    return all(s.tier in ("memory", "computed", "recomputed") for s in sources)


def _cached_tokens(pieces: list[_Piece], recomputed: torch.Tensor) -> int:
    """Prompt tokens whose K/V came from a stored entry and were not recomputed (pieces lie from position 0)."""
    cached, start = 0, 0
    for piece in pieces:
        n = piece.source.n_tokens
        if piece.served:
            cached += n - int(((recomputed >= start) & (recomputed < start + n)).sum())
        start += n
    return cached
