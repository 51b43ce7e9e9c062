"""How the next token is chosen, as OpenAI's API defines it: one place for the engine, the CLI, the Python API and
the server.

Temperature 0 (the default) is greedy: the argmax of the model's logits, the very path the exactness tests check.
Above 0 the logits are divided by the temperature, cut to the smallest set of tokens whose probability reaches
`top_p`, and sampled from a generator seeded by `seed` (same seed, same request, same model: same answer).
Penalties and `logit_bias` shift the logits first, as OpenAI documents them; with temperature 0 the argmax of the
shifted logits is taken. Log-probabilities are always those of the model's own distribution (before temperature,
penalties and bias), so they say how likely the model found each token.
"""
from __future__ import annotations

import math
import reprlib
import secrets
from dataclasses import dataclass, field

import torch

from .errors import QcfuseError

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 8
SEED_LIMIT = 1 << 63
LOGPROB_FLOOR = -9999.0        # reported for tokens the model gives no probability at all (JSON has no -inf)


class SamplingError(QcfuseError):
    """A sampling option out of its range; `param` names it as OpenAI's API does."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self):
        _number(self.temperature, "temperature", 0.0, 2.0)
        _number(self.top_p, "top_p", 0.0, 1.0)
        _number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if self.seed is not None:
            _integer(self.seed, "seed", -SEED_LIMIT, SEED_LIMIT - 1)
        _integer(self.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        _integer(self.n, "n", 1, MAX_N)
        if not isinstance(self.logprobs, bool):
            raise SamplingError("logprobs", f"logprobs must be true or false, got {reprlib.repr(self.logprobs)}")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs", "top_logprobs needs logprobs to be true")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP \
                or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError("stop", f"stop must be a non-empty string or an array of up to {MAX_STOP} "
                                        f"non-empty strings, got {reprlib.repr(self.stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.logit_bias, dict):
            raise SamplingError("logit_bias", "logit_bias must map token ids to numbers from -100 to 100")
        for token, bias in self.logit_bias.items():
            _integer(token, "logit_bias", 0, 1 << 31)
            _number(bias, "logit_bias", -100.0, 100.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shifts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def _number(value, param: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise SamplingError(param, f"{param} must be a number from {low:g} to {high:g}, got {reprlib.repr(value)}")


def _integer(value, param: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SamplingError(param, f"{param} must be an integer from {low} to {high}, got {reprlib.repr(value)}")


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]      # the most likely tokens at this step: (id, text, logprob)
    offset: int = 0                        # where the token's text begins in the answer


def check_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    bad = [t for t in params.logit_bias if t >= vocab_size]
    if bad:
        raise SamplingError("logit_bias", f"logit_bias names token {bad[0]}, but the vocabulary has {vocab_size} "
                                          "tokens")


class Sampler:
    """Chooses tokens for every answer of one request. One generator for all of them, so a seeded request with
    n answers is reproducible as a whole and its answers still differ from each other."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        check_vocabulary(params, vocab_size)
        self.params = params
        self.generator = torch.Generator().manual_seed(
            params.seed % (1 << 64) if params.seed is not None else secrets.randbits(63))
        self._bias = torch.zeros(vocab_size) if params.logit_bias else None
        for token, bias in params.logit_bias.items():
            self._bias[token] = float(bias)

    def choose(self, logits: torch.Tensor, history: list[int]) -> int:
        """The next token after `history` (this answer's tokens so far) from the logits [vocab]."""
        p = self.params
        if p.greedy and not p.shifts_logits:
            return int(logits.argmax())
        logits = logits.float().cpu().clone()
        if self._bias is not None:
            logits += self._bias
        if history and (p.presence_penalty or p.frequency_penalty):
            tokens, counts = torch.tensor(history).unique(return_counts=True)
            keep = tokens < logits.numel()
            tokens, counts = tokens[keep], counts[keep].float()
            logits[tokens] -= counts * p.frequency_penalty + p.presence_penalty
        if p.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            cut = ordered.cumsum(0) - ordered >= p.top_p      # the more likely tokens already reach top_p
            cut[0] = False                                    # the most likely token always stays
            ordered[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int, text, offset: int = 0) -> TokenLogprob:
    """`token`'s log-probability under the model's distribution, and the `top` most likely tokens.
    `text(id)` spells a token."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
    best = []
    if top:
        values, ids = logprobs.topk(top)
        best = [(int(i), text(int(i)), float(v)) for v, i in zip(values.cpu(), ids.cpu())]
    return TokenLogprob(token, text(token), float(logprobs[token]), best, offset)


class StopStrings:
    """Finds the first stop string in a growing text, and how much of the text's end could still become one
    (held back while streaming, so a stop string is never half sent)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Where the earliest stop string starts, looking only at matches that end at or after `new_from`."""
        start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def partial(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
