"""The OpenAI wire format: a chat request checked field by field, and the bodies the server sends back.

Validation is hand-written rather than a pydantic model so every mistake gets one plain sentence, the name of the
offending field (`param`) and a 4xx in OpenAI's error shape, which the official clients turn into typed exceptions.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from ..errors import QcfuseError
from ..fusion import SELECTORS, Selector, make_selector

DEFAULT_MAX_TOKENS = 128
MAX_TOKENS_LIMIT = 4096          # per request; the model window is checked as well
MAX_BODY_BYTES = 8 << 20
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
FUSION_KEYS = {"method", "ratio"}


class APIError(Exception):
    """A request the server refuses, with the status and the OpenAI error fields the client will see."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code)


@dataclass
class ChatRequest:
    question: str
    documents: list[str]
    selector: Selector
    max_tokens: int
    stream: bool


def parse_chat_request(body: object, served_model: str, default_method: str, default_ratio: float) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    return ChatRequest(
        question=_question(body.get("messages")),
        documents=_documents(body.get("documents")),
        selector=_selector(body.get("fusion"), default_method, default_ratio),
        max_tokens=_max_tokens(body),
        stream=stream,
    )


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
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise APIError(400, "only text content parts are supported", param=param)
        return "\n".join(p["text"] for p in content)
    raise APIError(400, "message content must be a string or an array of text parts", param=param)


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
    return documents


def _selector(fusion: object, default_method: str, default_ratio: float) -> Selector:
    fusion = {} if fusion is None else fusion
    if not isinstance(fusion, dict):
        raise APIError(400, "fusion must be an object like {\"method\": \"qcfuse\", \"ratio\": 0.15}", param="fusion")
    unknown = sorted(set(fusion) - FUSION_KEYS)
    if unknown:
        raise APIError(400, f"unknown fusion field(s) {', '.join(unknown)}; expected method and ratio",
                       param=f"fusion.{unknown[0]}")
    method = fusion.get("method", default_method)
    if method not in SELECTORS:
        raise APIError(400, f"unknown method '{method}' (choose from: {', '.join(sorted(SELECTORS))})",
                       param="fusion.method")
    ratio = fusion.get("ratio", default_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0.0 <= ratio <= 1.0:
        raise APIError(400, f"fusion.ratio must be a number within [0, 1], got {ratio!r}", param="fusion.ratio")
    try:
        return make_selector(method, ratio)
    except QcfuseError as exc:
        raise APIError(400, str(exc), param="fusion") from None


def _max_tokens(body: dict) -> int:
    """max_completion_tokens wins over the older max_tokens when both are sent, as in OpenAI's API."""
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise APIError(400, f"{param} must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {value!r}",
                           param=param)
        return value
    return DEFAULT_MAX_TOKENS


# -- what the server sends back ------------------------------------------------------------------------------
def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def new_completion_id() -> tuple[str, int]:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(stats: dict) -> dict:
    prompt, completion = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


def completion_body(cid: str, created: int, model: str, text: str, finish_reason: str, stats: dict) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(stats),
        "fusion": fusion_stats(stats),
    }


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               stats: dict | None = None) -> dict:
    body = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if stats is not None:                      # the last chunk carries what the non-streaming body does
        body["usage"] = usage(stats)
        body["fusion"] = fusion_stats(stats)
    return body
