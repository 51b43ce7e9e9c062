"""The OpenAI wire format: chat and text completion requests checked field by field, and the bodies sent back.

Validation is hand-written rather than a pydantic model so every mistake gets one plain sentence, the name of the
offending field (`param`) and a 4xx in OpenAI's error shape, which the official clients turn into typed exceptions.
A field the server does not implement is refused with 400 rather than ignored (unless it is sent with a value that
asks for nothing, such as `tools: []` or `response_format: {"type": "text"}`), and so is a field OpenAI does not
know.
"""
from __future__ import annotations

import math
import re
import reprlib
import time
import uuid
from dataclasses import dataclass, field

from ..engine import Choice
from ..fusion import SELECTORS, Selector, make_selector
from ..fusion.budget import AUTO, RULES, ratio_spec
from ..errors import QcfuseError
from ..sampling import SamplingError, SamplingParams, TokenLogprob

DEFAULT_MAX_TOKENS = {"chat": 128, "text": 16}      # OpenAI's legacy completions default to 16 tokens too
MAX_TOKENS_LIMIT = 4096          # per answer; the model window is checked as well
MAX_TEXT_LOGPROBS = 5            # /v1/completions: `logprobs` is how many alternatives, at most 5 (as OpenAI)
MAX_BODY_BYTES = 8 << 20
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
FUSION_KEYS = {"method", "ratio", "target", "max_ratio", "rule", "reuse_check"}   # all but two: ratio "auto" only
STREAM_OPTION_KEYS = {"include_usage", "include_obfuscation"}

SAMPLING_FIELDS = {"temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty",
                   "logit_bias", "logprobs"}
FIELDS = {
    "chat": {"model", "messages", "documents", "fusion", "max_tokens", "max_completion_tokens", "stream",
             "stream_options", "top_logprobs"} | SAMPLING_FIELDS,
    "text": {"model", "prompt", "documents", "fusion", "max_tokens", "stream", "stream_options"} | SAMPLING_FIELDS,
}
IGNORED = {"user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}


def _absent(value) -> bool:
    return value is None


# fields OpenAI defines that this server does not implement: accepted only with a value that asks for nothing
UNSUPPORTED = {
    "chat": {
        "tools": lambda v: v is None or v == [], "functions": lambda v: v is None or v == [],
        "tool_choice": lambda v: v in (None, "none", "auto"), "function_call": lambda v: v in (None, "none", "auto"),
        "response_format": lambda v: v is None or v == {"type": "text"},
        "modalities": lambda v: v is None or v == ["text"], "store": lambda v: v is None or v is False,
        "audio": _absent, "prediction": _absent, "web_search_options": _absent, "reasoning_effort": _absent,
        "verbosity": _absent,
    },
    "text": {
        "echo": lambda v: v is None or v is False, "best_of": lambda v: v is None or (type(v) is int and v == 1),
        "suffix": lambda v: v is None or v == "",
    },
}


class APIError(Exception):
    """A request the server refuses, with the status and the OpenAI error fields the client will see."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = "invalid_value",
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, error_type

    def body(self) -> dict:
        return error_body(self.message, self.type, param=self.param, code=self.code)


@dataclass
class CompletionRequest:
    route: str                  # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    documents: list[str]
    selector: Selector
    max_tokens: int
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    question: str = ""          # chat: the last user message
    prompt: str = ""            # text: the client's own prompt
    extras: dict = field(default_factory=dict)


def parse_request(route: str, body: object, served_model: str, default_method: str,
                  default_ratio: float) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_fields(route, body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    if model is not None and model != served_model:
        raise APIError(404, f"the model {_show(model)} does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    stream = _flag(body, "stream")
    request = CompletionRequest(
        route=route,
        documents=_documents(body.get("documents")),
        selector=_selector(body.get("fusion"), default_method, default_ratio),
        max_tokens=_max_tokens(body, route),
        sampling=_sampling(body, route),
        stream=stream,
        include_usage=_stream_options(body.get("stream_options"), stream),
    )
    if route == "chat":
        request.question = _question(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return request


def _check_fields(route: str, body: dict) -> None:
    for name in body:
        if name in FIELDS[route] or name in IGNORED:
            continue
        accepts = UNSUPPORTED[route].get(name)
        if accepts is None:
            raise APIError(400, f"unrecognized request argument supplied: {_show(name)}", param=name[:64],
                           code="unknown_parameter")
        if not accepts(body[name]):
            raise APIError(400, f"{name} is not supported by this server (qcfuse answers with text only)",
                           param=name, code="unsupported_parameter")


def _show(value, limit: int = 80) -> str:
    """A value quoted for an error message, short however big or deep it is."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(value: str, param: str) -> str:
    """Text the tokenizer can take: a lone surrogate (valid in JSON's escapes, not in Unicode) is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param=param) from None
    return value


def _flag(body: dict, param: str) -> bool:
    value = body.get(param)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{param} must be true or false", param=param)
    return value


def _stream_options(options: object, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    for key, value in options.items():
        if key not in STREAM_OPTION_KEYS:
            raise APIError(400, f"unknown stream_options field {_show(key)}", param=f"stream_options.{key[:40]}")
        if value is not None and not isinstance(value, bool):
            raise APIError(400, f"stream_options.{key} must be true or false", param=f"stream_options.{key}")
    return bool(options.get("include_usage"))


def _question(messages: object) -> str:
    """The last user message is the question; earlier turns and system messages are not used (see README)."""
    if messages is None:
        raise APIError(400, "messages is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array", param="messages")
    question = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role ({', '.join(sorted(ROLES))})",
                           param=f"messages[{i}]")
        if message["role"] == "user":
            question = _text(message.get("content"), f"messages[{i}].content")
    if question is None:
        raise APIError(400, "messages must contain a user message (its content is the question)", param="messages")
    if not question.strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return question


def _text(content: object, param: str) -> str:
    """Message content as text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return _string(content, param)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise APIError(400, "only text content parts are supported", param=param)
        return _string("\n".join(p["text"] for p in content), param)
    raise APIError(400, "message content must be a string or an array of text parts", param=param)


def _prompt(prompt: object) -> str:
    """One prompt string (or an array holding one): batches and token arrays are not served."""
    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request; token arrays are not supported)",
                       param="prompt")
    if not prompt.strip():
        raise APIError(400, "prompt is empty", param="prompt")
    return _string(prompt, "prompt")


def _documents(documents: object) -> list[str]:
    if documents is None:
        return []
    if not isinstance(documents, list):
        raise APIError(400, "documents must be an array of strings", param="documents")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise APIError(400, f"documents[{i}] must be a string", param=f"documents[{i}]")
        if not doc.strip():
            raise APIError(400, f"documents[{i}] is empty", param=f"documents[{i}]")
        _string(doc, f"documents[{i}]")
    return documents


def _selector(fusion: object, default_method: str, default_ratio: float) -> Selector:
    fusion = {} if fusion is None else fusion
    if not isinstance(fusion, dict):
        raise APIError(400, "fusion must be an object like {\"method\": \"qcfuse\", \"ratio\": 0.15}", param="fusion")
    unknown = sorted(set(fusion) - FUSION_KEYS)
    if unknown:
        raise APIError(400, f"unknown fusion field(s) {_show(unknown)}; expected method, ratio (a number or "
                            f"\"auto\"), and with \"auto\" target, max_ratio, rule and reuse_check",
                       param=f"fusion.{unknown[0][:40]}")
    method = fusion.get("method", default_method)
    if not isinstance(method, str) or method not in SELECTORS:
        raise APIError(400, f"unknown method {_show(method)} (choose from: {', '.join(sorted(SELECTORS))})",
                       param="fusion.method")
    ratio = fusion.get("ratio", default_ratio)
    auto = isinstance(ratio, str) and ratio.strip().lower().startswith(AUTO)
    if not auto and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio)
                     or not 0.0 <= ratio <= 1.0):
        raise APIError(400, f"fusion.ratio must be a number within [0, 1] or \"auto\", got {_show(ratio)}",
                       param="fusion.ratio")
    for key in ("target", "max_ratio"):
        value = fusion.get(key)
        if value is None:
            continue
        if not auto:
            raise APIError(400, f"fusion.{key} applies to \"ratio\": \"auto\" only", param=f"fusion.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 < value <= 1.0 or (key == "target" and value >= 1.0):
            bounds = "(0, 1)" if key == "target" else "(0, 1]"
            raise APIError(400, f"fusion.{key} must be a number within {bounds}, got {_show(value)}",
                           param=f"fusion.{key}")
    options = {"max_ratio": float(fusion["max_ratio"])} if fusion.get("max_ratio") is not None else {}
    rule = fusion.get("rule")
    if rule is not None:
        if not auto:
            raise APIError(400, "fusion.rule applies to \"ratio\": \"auto\" only", param="fusion.rule")
        if rule not in RULES:
            raise APIError(400, f"fusion.rule must be one of {', '.join(RULES)}, got {_show(rule)}",
                           param="fusion.rule")
        options["auto_rule"] = rule
    check = fusion.get("reuse_check")
    if check is not None:
        if not auto:
            raise APIError(400, "fusion.reuse_check applies to \"ratio\": \"auto\" only", param="fusion.reuse_check")
        if not isinstance(check, bool):
            raise APIError(400, f"fusion.reuse_check must be true or false, got {_show(check)}",
                           param="fusion.reuse_check")
        options["reuse_check"] = check
    if auto:
        try:
            ratio = ratio_spec(ratio, fusion.get("target"))          # "auto", "auto:0.9", or a separate target
        except QcfuseError as exc:
            raise APIError(400, f"fusion.ratio: {exc}", param="fusion.ratio") from None
    try:
        return make_selector(method, ratio, **options)
    except QcfuseError as exc:
        raise APIError(400, str(exc), param="fusion") from None


def _max_tokens(body: dict, route: str) -> int:
    """max_completion_tokens wins over the older max_tokens when both are sent, as in OpenAI's API."""
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise APIError(400, f"{param} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {_show(value)}",
                           param=param)
        return value
    return DEFAULT_MAX_TOKENS[route]


_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _sampling(body: dict, route: str) -> SamplingParams:
    """The sampling fields, checked by SamplingParams itself (the CLI and the Python API share its checks)."""
    values = {name: body[name] for name in ("temperature", "top_p", "seed", "n", "presence_penalty",
                                            "frequency_penalty") if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        values["stop"] = tuple(stop) if isinstance(stop, list) else stop
        for text in stop if isinstance(stop, list) else [stop]:
            if isinstance(text, str):
                _string(text, "stop")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(isinstance(k, str) and _TOKEN_ID.fullmatch(k) for k in bias):
            raise APIError(400, "logit_bias must map token ids (as strings) to numbers from -100 to 100",
                           param="logit_bias")
        values["logit_bias"] = {int(k): v for k, v in bias.items()}
    logprobs = body.get("logprobs")
    if route == "chat":
        if logprobs is not None:
            values["logprobs"] = logprobs
        if body.get("top_logprobs") is not None:
            values["top_logprobs"] = body["top_logprobs"]
    elif logprobs is not None:           # legacy completions: an integer, how many alternatives to list
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TEXT_LOGPROBS:
            raise APIError(400, f"logprobs must be an integer from 0 to {MAX_TEXT_LOGPROBS}, got {_show(logprobs)}",
                           param="logprobs")
        values.update(logprobs=True, top_logprobs=logprobs)
    try:
        return SamplingParams(**values)
    except SamplingError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


# -- what the server sends back ------------------------------------------------------------------------------
def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape. Text that came from the request may hold lone surrogates: replaced, so the body
    can always be encoded."""
    def safe(text):
        return text.encode("utf-8", "replace").decode("utf-8") if isinstance(text, str) else text
    return {"error": {"message": safe(message), "type": error_type, "param": safe(param), "code": code}}


def new_completion_id(route: str) -> tuple[str, int]:
    return f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(stats: dict) -> dict:
    prompt, completion = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(stats.get("cached_tokens", 0))}}


def fusion_stats(stats: dict) -> dict:
    """Every key of the engine's stats, made JSON-safe (numbers, strings and containers pass through)."""
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return value.item()
        return str(value)
    return {str(k): plain(v) for k, v in stats.items()}


class Replies:
    """The bodies of one request's reply, in the shape of its route: `chat.completion` (+ `.chunk`) or
    `text_completion`."""

    def __init__(self, route: str, model: str, fingerprint: str, include_usage: bool = False):
        self.route, self.model, self.include_usage = route, model, include_usage
        self.id, self.created = new_completion_id(route)
        self.system_fingerprint = f"qcfuse-{fingerprint[:12]}"

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices}

    # -- whole answers --------------------------------------------------------------------------------------
    def body(self, choices: list[Choice], stats: dict) -> dict:
        if self.route == "chat":
            out = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason}
                   for i, c in enumerate(choices)]
            body = self._envelope("chat.completion", out)
        else:
            out = [{"index": i, "text": c.text, "logprobs": self.logprobs(c.logprobs),
                    "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
            body = self._envelope("text_completion", out)
        return {**body, "usage": usage(stats), "fusion": fusion_stats(stats)}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        if self.route == "chat":
            return {"content": [{**_chat_logprob(lp.token, lp.logprob),
                                 "top_logprobs": [_chat_logprob(t, v) for _, t, v in lp.top]} for lp in entries],
                    "refusal": None}
        return {"tokens": [lp.token for lp in entries], "token_logprobs": [lp.logprob for lp in entries],
                "top_logprobs": [{t: v for _, t, v in lp.top} for lp in entries],
                "text_offset": [lp.offset for lp in entries]}

    # -- streamed answers -----------------------------------------------------------------------------------
    def chunk(self, index: int, text: str | None = None, logprobs: list[TokenLogprob] | None = None,
              finish_reason: str | None = None, role: bool = False) -> dict:
        if self.route == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs) if logprobs else None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(logprobs) if logprobs else None,
                      "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, stats: dict) -> dict:
        """The last chunk with stream_options.include_usage: no choices, the usage (and qcfuse's stats)."""
        obj = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage(stats), "fusion": fusion_stats(stats)}


def _chat_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}
