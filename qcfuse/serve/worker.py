"""One model, one engine, one thread.

Every call that touches the model, the tokenizer or the cache store runs on a single worker thread, so requests
never race on the store or on torch state, and the event loop stays free to accept and answer other requests.
On top of that a FIFO turn lets one request at a time use the engine from its prefill to its last token, so at
most one request's KV buffer is alive; the others wait in line.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..engine import FusionEngine
from ..errors import QcfuseError
from ..fusion import Selector, make_selector
from ..prompt import PromptLayout, build_text_layout
from ..sampling import SamplingError, check_vocabulary
from .schema import APIError, CompletionRequest


class EngineWorker:
    def __init__(self, engine: FusionEngine):
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcfuse-engine")
        self._turn = asyncio.Lock()           # asyncio.Lock wakes its waiters in arrival order

    async def run(self, fn, *args):
        """fn(*args) on the engine thread. If the caller is cancelled the call still finishes there, so the
        next caller never overlaps it."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def turn(self) -> asyncio.Lock:
        """`async with worker.turn():` holds the engine for a whole request."""
        return self._turn

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


@dataclass
class PreparedRequest:
    layout: PromptLayout
    selector: Selector


def prepare(engine: FusionEngine, request: CompletionRequest) -> PreparedRequest:
    """Tokenize the prompt and check it fits the window (on the engine thread: the tokenizer is not shared).
    Everything a request can get wrong is found here, before a stream's 200 goes out."""
    where = "messages" if request.route == "chat" else "prompt"
    selector = request.selector
    try:
        check_vocabulary(request.sampling, engine.model.transformer.vocab_size)
        if request.route == "text":
            layout = build_text_layout(engine.model.tokenizer, request.documents, request.prompt)
        elif request.documents:
            layout = engine.layout(request.documents, request.question)
        else:   # nothing to fuse: the same template with no passages
            shaped = engine.layout(["-"], request.question)
            layout = PromptLayout(shaped.prefix, [], shaped.suffix, shaped.question)
    except SamplingError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except QcfuseError as exc:
        raise APIError(400, str(exc), param=where) from None
    if not layout.chunks:           # plain prefill
        selector = make_selector("fullcomp")
    try:
        engine.check_fits(layout, request.max_tokens)
    except QcfuseError as exc:
        raise APIError(400, str(exc), param=where, code="context_length_exceeded") from None
    return PreparedRequest(layout, selector)
