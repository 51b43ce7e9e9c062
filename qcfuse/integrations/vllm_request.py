"""A fused RAG request for vLLM, as the client builds it and as the connector reads it back (no vLLM import here).

The client builds the prompt's token ids piece by piece with qcfuse's own layout (each chunk tokenized alone), so
the chunk caches the connector reads line up with vLLM's prompt token for token: there is no tokenization seam to
guess at. The fusion travels in the request's `kv_transfer_params["qcfuse"]`: chunk spans, question span, method,
ratio, options. `cache_salt` (a hash of those parameters and of every prompt token) keeps the request's fused KV
blocks in vLLM's prefix cache apart from any other request's: they are reused only by the very same fused request,
never by a plain one or by another question over the same documents. The connector recomputes the salt and refuses
a request whose salt does not match, so parameters built for other token ids are never applied.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import QcfuseError
from ..prompt import PromptLayout, build_layout

PARAMS_KEY = "qcfuse"          # kv_transfer_params[PARAMS_KEY] holds the fusion
PARAMS_VERSION = 1


@dataclass
class VllmPrompt:
    """One fused request: pass `prompt` and `sampling_extra_args` to vllm.LLM, or `completion_fields()` to
    vLLM's OpenAI server (/v1/completions)."""
    prompt_token_ids: list[int]
    kv_transfer_params: dict
    cache_salt: str
    layout: PromptLayout

    @property
    def prompt(self) -> dict:
        """A vLLM TokensPrompt: `llm.generate(p.prompt, SamplingParams(..., extra_args=p.sampling_extra_args))`."""
        return {"prompt_token_ids": list(self.prompt_token_ids), "cache_salt": self.cache_salt}

    @property
    def sampling_extra_args(self) -> dict:
        return {"kv_transfer_params": self.kv_transfer_params}

    def completion_fields(self) -> dict:
        """Body fields of a /v1/completions request (with the openai client: `prompt` as is, the other two in
        `extra_body`)."""
        return {"prompt": list(self.prompt_token_ids), "kv_transfer_params": self.kv_transfer_params,
                "cache_salt": self.cache_salt}


@dataclass(frozen=True)
class FusionPlan:
    """What the connector reads back from a request: the prompt's layout and the selector to build."""
    layout: PromptLayout
    method: str
    ratio: float
    options: dict

    @property
    def context_len(self) -> int:
        return self.layout.context_len


def vllm_prompt(tokenizer, documents: list[str], question: str, method: str = "qcfuse", ratio: float = 0.15,
                **options) -> VllmPrompt:
    """The token ids and fusion parameters of a RAG request over `documents`, in qcfuse's prompt layout.
    `tokenizer` is the served model's tokenizer (a transformers tokenizer) or a model alias or directory."""
    from ..fusion import make_selector
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..model.loader import load_tokenizer
        tokenizer = load_tokenizer(str(tokenizer))
    make_selector(method, ratio, **options)          # unknown method, ratio outside [0, 1], bad option: fail here
    _check_json(options)
    layout = build_layout(tokenizer, documents, question)
    ids = layout.ids.tolist()
    q0 = layout.context_len + layout.question[0]
    params = {"version": PARAMS_VERSION, "method": method, "ratio": float(ratio), "options": dict(options),
              "chunks": [list(span) for span in layout.chunk_spans()],
              "question": [q0, q0 + layout.question[1] - layout.question[0]]}
    return VllmPrompt(ids, {PARAMS_KEY: params}, cache_salt(ids, params), layout)


def cache_salt(prompt_token_ids: list[int], params: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(",".join(map(str, prompt_token_ids)).encode())
    return "qcfuse-" + h.hexdigest()


def read_fusion(prompt_token_ids: list[int], kv_transfer_params: dict | None, salt: str | None) -> FusionPlan | None:
    """The fusion a request asks for; None when it asks for none (a plain vLLM request). Raises QcfuseError saying
    what is wrong with parameters that cannot be applied to this prompt."""
    if not kv_transfer_params or PARAMS_KEY not in kv_transfer_params:
        return None
    params = kv_transfer_params[PARAMS_KEY]
    if not isinstance(params, dict):
        raise QcfuseError(f"kv_transfer_params.{PARAMS_KEY} must be an object, got {type(params).__name__}")
    if params.get("version") != PARAMS_VERSION:
        raise QcfuseError(f"kv_transfer_params.{PARAMS_KEY}.version must be {PARAMS_VERSION} (build the request "
                          f"with qcfuse.vllm_prompt of the same qcfuse version as the server)")
    ids = list(prompt_token_ids or [])
    if salt != cache_salt(ids, params):
        raise QcfuseError("cache_salt does not match the prompt and its fusion parameters: send the prompt token "
                          "ids, kv_transfer_params and cache_salt exactly as qcfuse.vllm_prompt built them")
    try:
        chunks = [(int(s), int(e)) for s, e in params["chunks"]]
        q0, q1 = (int(x) for x in params["question"])
        method, ratio, options = str(params["method"]), float(params["ratio"]), dict(params.get("options") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise QcfuseError(f"malformed kv_transfer_params.{PARAMS_KEY}: {type(exc).__name__}: {exc}") from None
    if not chunks:
        raise QcfuseError("the fusion names no document chunks")
    pos = chunks[0][0]
    for s, e in chunks:
        if s != pos or e <= s:
            raise QcfuseError("document chunks must be non-empty and follow each other without gaps")
        pos = e
    if not pos <= q0 < q1 <= len(ids):
        raise QcfuseError(f"the question span [{q0}, {q1}) must lie in the prompt after the documents (which end "
                          f"at {pos}; the prompt has {len(ids)} tokens)")
    from ..fusion import make_selector
    make_selector(method, ratio, **options)
    layout = PromptLayout(prefix=ids[:chunks[0][0]], chunks=[ids[s:e] for s, e in chunks], suffix=ids[pos:],
                          question=(q0 - pos, q1 - pos))
    return FusionPlan(layout, method, ratio, options)


def _check_json(options: dict) -> None:
    try:
        json.dumps(options)
    except TypeError as exc:
        raise QcfuseError(f"method options must be JSON values (numbers, strings, lists): {exc}") from None
