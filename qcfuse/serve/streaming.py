"""Generation one token at a time, so the server can send each token as soon as it exists and stop decoding the
moment its client leaves.

`FusionEngine.generate_layout` decodes every token before it returns. TokenStream does the same work in steps:
`FusionEngine.prefill` up to the first token (same stats), then each `next_text()` is one step of
`greedy_decode`. Same selector, same caches: same tokens (tests/test_server.py checks that the streamed and
the plain answer agree token for token).
"""
from __future__ import annotations

import time

import torch

from ..engine import FusionEngine
from ..fusion import Selector
from ..fusion.fuse import decode_step
from ..prompt import PromptLayout


class TokenStream:
    @torch.inference_mode()
    def __init__(self, engine: FusionEngine, layout: PromptLayout, selector: Selector, max_new_tokens: int):
        t0 = time.perf_counter()
        engine.check_fits(layout, max_new_tokens)
        self._model = engine.model.transformer
        self._tokenizer = engine.model.tokenizer
        self._stop_ids = engine.model.stop_ids
        self._start = layout.n_tokens
        self.max_new_tokens = max_new_tokens
        out, self.stats = engine.prefill(layout, selector, max_new_tokens, t0)
        self._buffer, self._logits = out.buffer, out.logits
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None      # "stop" (a stop token) or "length" (max_new_tokens)
        self._sent_text = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_text(self) -> str:
        """Decode one more token; the text it adds to the answer ('' while a multi-byte character is incomplete)."""
        t0 = time.perf_counter()
        self._next_token()
        self.stats["new_tokens"] = len(self.token_ids)
        self.stats["decode_s"] += time.perf_counter() - t0
        return self._text_delta()

    @torch.inference_mode()
    def _next_token(self) -> int:
        if self.finished:
            raise RuntimeError("the stream has already finished")
        if self.token_ids:                          # feed the previous token to get the next logits
            position = self._start + len(self.token_ids) - 1
            self._logits = decode_step(self._model, self._buffer, self.token_ids[-1], position)
        token = int(self._logits.argmax())
        self.token_ids.append(token)
        if token in self._stop_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return token

    def _text_delta(self) -> str:
        """Decode everything so far and hand out only the new tail, so tokens that merge into one word or
        character come out right."""
        ids = [t for t in self.token_ids if t not in self._stop_ids]
        text = self._tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") and not self.finished:
            return ""
        if not text.startswith(self._sent_text):
            return ""
        delta, self._sent_text = text[len(self._sent_text):], text
        return delta
