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
from ..prompt import PromptLayout
from .schema import APIError, ChatRequest


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


def prepare(engine: FusionEngine, chat: ChatRequest) -> PreparedRequest:
    """Tokenize the prompt and check it fits the window (on the engine thread: the tokenizer is not shared)."""
    if chat.documents:
        layout, selector = engine.layout(chat.documents, chat.question), chat.selector
    else:   # nothing to fuse: the same template with no passages, plain prefill
        shaped = engine.layout(["-"], chat.question)
        layout = PromptLayout(shaped.prefix, [], shaped.suffix, shaped.question)
        selector = make_selector("fullcomp")
    try:
        engine.check_fits(layout, chat.max_tokens)
    except QcfuseError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    return PreparedRequest(layout, selector)
