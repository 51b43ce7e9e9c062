"""Answers decoded one token at a time from a prefilled prompt, so a server can send each piece of text as soon
as it exists, and stop the moment its client leaves.

`FusionEngine.start` runs the prefill and returns `Answers`; each `Answers.next()` is one answer (a request may
ask for n), decoded by `Decoding.step()` or all at once by `Decoding.run()`. Every answer of a request decodes on
the same KV buffer: decoding writes only the rows after the prompt and each step attends to the rows before its
own position, so the prompt's K/V serve every answer unchanged and n answers cost one prefill.
"""
from __future__ import annotations

import time
import torch

from .fusion.fuse import FuseResult, decode_step
from .model.loader import LoadedModel
from .sampling import Sampler, SamplingParams, StopStrings, TokenLogprob, token_logprobs


class Answers:
    def __init__(self, model: LoadedModel, out: FuseResult, stats: dict, start: int, max_new_tokens: int,
                 sampling: SamplingParams, sampler: Sampler, strip: bool = True):
        self.model, self.out, self.stats = model, out, stats
        self.start, self.max_new_tokens = start, max_new_tokens
        self.sampling, self.sampler, self.strip = sampling, sampler, strip
        self.stops = StopStrings(sampling.stop)
        self.issued = 0

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def remaining(self) -> int:
        return self.n - self.issued

    def next(self) -> Decoding:
        if not self.remaining:
            raise RuntimeError(f"all {self.n} answers have been decoded")
        self.issued += 1
        return Decoding(self, self.issued - 1)


class Decoding:
    """One answer. `text` is the answer so far (without any stop string); `step()` hands out only what can no
    longer change: never a half character, never the start of what may turn out to be a stop string."""

    def __init__(self, answers: Answers, index: int):
        self._answers, self.index = answers, index
        self._model = answers.model.transformer
        self._tokenizer = answers.model.tokenizer
        self._stop_ids = answers.model.stop_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None      # "stop" (stop token or string) or "length" (max_new_tokens)
        self._logits = answers.out.logits
        self._text = ""                            # the whole answer so far, cut before any stop string
        self._sent = ""                            # the part handed out by step()
        self._logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The answer: trimmed of surrounding whitespace for chat (strip=True), as decoded otherwise."""
        return self._text.strip() if self._answers.strip else self._text

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per token of the answer's text (stop tokens and stop strings excluded); None when not asked."""
        if not self._answers.sampling.logprobs:
            return None
        return [lp for lp in self._logprobs if lp.offset < len(self._text)]

    def take_logprobs(self) -> list[TokenLogprob]:
        """The entries of the tokens whose text step() has handed out since the last call."""
        ready = [lp for lp in self._logprobs[self._logprobs_sent:] if lp.offset < len(self._sent)]
        self._logprobs_sent += len(ready)
        return ready

    def run(self) -> Decoding:
        while not self.finished:
            self.step()
        return self

    @torch.inference_mode()
    def step(self) -> str:
        """Decode one more token; the text it releases ('' while held back)."""
        if self.finished:
            raise RuntimeError("the answer is already finished")
        t0 = time.perf_counter()
        answers = self._answers
        if self.token_ids:                          # feed the previous token to get the next logits
            position = answers.start + len(self.token_ids) - 1
            self._logits = decode_step(self._model, answers.out.buffer, self.token_ids[-1], position)
        token = answers.sampler.choose(self._logits, self.token_ids)
        self.token_ids.append(token)
        if token in self._stop_ids:
            self.finish_reason = "stop"
        else:
            if answers.sampling.logprobs:
                self._logprobs.append(token_logprobs(self._logits, token, answers.sampling.top_logprobs,
                                                     self._spell, offset=len(self._text)))
            self._update_text()
        if not self.finished and len(self.token_ids) >= answers.max_new_tokens:
            self.finish_reason = "length"
        answers.stats["new_tokens"] += 1
        answers.stats["decode_s"] += time.perf_counter() - t0
        return self._release()

    def _update_text(self) -> None:
        ids = [t for t in self.token_ids if t not in self._stop_ids]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        if self._answers.strip:
            text = text.lstrip()
        cut = self._answers.stops.find(text, new_from=len(self._text)) if self._answers.stops.stops else None
        if cut is not None:
            text, self.finish_reason = text[:cut], "stop"
        self._text = text

    def _release(self) -> str:
        text = self._text
        if not self.finished:
            if text.endswith("\ufffd"):             # a character still incomplete
                return ""
            text = text[: len(text) - self._answers.stops.partial(text)]
        if not text.startswith(self._sent):          # tokens merged into different text: wait for more
            return ""
        delta, self._sent = text[len(self._sent):], text
        return delta

    def _spell(self, token: int) -> str:
        return self._tokenizer.decode([token])
