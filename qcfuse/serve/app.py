"""The OpenAI-compatible HTTP API over one FusionEngine: chat completions (plain and SSE), models, health, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import FusionEngine
from ..errors import QcfuseError
from ..fusion import make_selector
from .metrics import ServerMetrics
from .schema import (MAX_BODY_BYTES, APIError, ChatRequest, chunk_body, completion_body, error_body,
                     new_completion_id, parse_chat_request)
from .streaming import TokenStream
from .worker import EngineWorker, PreparedRequest, prepare

log = logging.getLogger("qcfuse.serve")
MAX_QUEUE = 64            # requests waiting for the engine before new ones get 429
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: FusionEngine, model_name: str, method: str = "qcfuse", ratio: float = 0.15,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE) -> FastAPI:
    """An app serving `engine` as model `model_name`. `method`/`ratio` apply when a request names no fusion;
    bodies over `max_body_bytes` are refused with 413; with `max_queue` requests already waiting for the
    engine, a new one is refused with 429 and a Retry-After estimate (clients back off instead of piling up)."""
    make_selector(method, ratio)              # a bad default fails at start-up, not on the first request
    if max_queue < 1:
        raise QcfuseError("--max_queue must be at least 1")
    worker = EngineWorker(engine)
    # requests admitted but not yet holding the engine: still arriving (body, tokenizing) or waiting for their
    # turn; and a running estimate of the time one request holds the engine
    queue = {"arriving": 0, "waiting": 0, "service_s": 1.0}
    metrics = ServerMetrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = FastAPI(title="qcfuse", version="0.1.0", lifespan=lifespan)
    app.state.metrics, app.state.worker = metrics, worker

    # -- errors: always OpenAI's shape ------------------------------------------------------------------------
    def error_response(status: int, body: dict, headers=None) -> JSONResponse:
        metrics.errors.labels(status=str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return error_response(exc.status, exc.body())

    @app.exception_handler(QcfuseError)
    async def qcfuse_error(_request, exc: QcfuseError):
        return error_response(400, error_body(str(exc), code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, error_body(str(exc.detail), code=code), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        log.exception("request failed")
        return error_response(500, error_body(f"internal error: {type(exc).__name__}", "server_error",
                                              code="internal_error"))

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "qcfuse"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def engine_turn():
        """The engine for one whole request, in arrival order; the wait is counted for admission control."""
        queue["waiting"] += 1
        try:
            await worker.turn().acquire()
        finally:
            queue["waiting"] -= 1
        began = time.perf_counter()
        try:
            yield
        finally:
            worker.turn().release()
            queue["service_s"] = 0.8 * queue["service_s"] + 0.2 * (time.perf_counter() - began)

    def admit() -> None:
        queued = queue["arriving"] + queue["waiting"]
        if queued >= max_queue:
            retry = max(1, min(60, math.ceil(queue["service_s"] * (queued + 1))))
            raise QueueFull(f"the server is busy: {queued} requests are already waiting for the engine "
                            f"(--max_queue {max_queue}); retry in about {retry} s", retry)
        queue["arriving"] += 1

    @app.exception_handler(QueueFull)
    async def queue_full(_request, exc: QueueFull):
        return error_response(429, error_body(str(exc), "rate_limit_error", code="server_busy"),
                              {"Retry-After": str(exc.retry_after_s)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        metrics.requests.inc()
        admit()
        try:
            chat = parse_chat_request(await _read_json(request, max_body_bytes), model_name, method, ratio)
            prepared = await worker.run(prepare, engine, chat)
        finally:        # from here it counts as waiting (engine_turn), with no await in between
            queue["arriving"] -= 1
        if chat.stream:
            return StreamingResponse(stream_events(chat, prepared, arrived), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        with metrics.in_flight.track_inprogress():
            async with engine_turn():
                queue_s = time.perf_counter() - arrived
                if await request.is_disconnected():        # left while queued: do not generate for nobody
                    metrics.disconnects.inc()
                    return Response(status_code=499)
                gen = await worker.run(engine.generate_layout, prepared.layout, prepared.selector, chat.max_tokens)
        stats = record(gen.stats, prepared, queue_s, arrived)
        finish = "stop" if gen.token_ids and gen.token_ids[-1] in engine.model.stop_ids else "length"
        cid, created = new_completion_id()
        return JSONResponse(completion_body(cid, created, model_name, gen.answer, finish, stats))

    async def stream_events(chat: ChatRequest, prepared: PreparedRequest, arrived: float):
        """SSE chunks of one answer. Holding the turn across yields means a slow reader slows only its own
        request's turn; a client that leaves cancels this generator and frees the turn at the next token."""
        cid, created = new_completion_id()
        try:
            with metrics.in_flight.track_inprogress():
                async with engine_turn():
                    queue_s = time.perf_counter() - arrived
                    stream = await worker.run(TokenStream, engine, prepared.layout, prepared.selector,
                                              chat.max_tokens)
                    yield _event(chunk_body(cid, created, model_name, {"role": "assistant", "content": ""}))
                    while not stream.finished:
                        text = await worker.run(stream.next_text)
                        if text:
                            yield _event(chunk_body(cid, created, model_name, {"content": text}))
            stats = record(stream.stats, prepared, queue_s, arrived)
            yield _event(chunk_body(cid, created, model_name, {}, stream.finish_reason, stats))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            metrics.disconnects.inc()
            raise
        except Exception as exc:                 # the 200 header is already out: report in-band, as OpenAI does
            log.exception("streamed request failed")
            metrics.errors.labels(status="500").inc()
            yield _event(error_body(f"internal error: {type(exc).__name__}", "server_error", code="internal_error"))
            yield "data: [DONE]\n\n"

    def record(stats: dict, prepared: PreparedRequest, queue_s: float, arrived: float) -> dict:
        """Count one answered request in the metrics; its stats as the client sees them."""
        stats = server_stats(stats, prepared, queue_s)
        metrics.observe(stats)
        metrics.latency.observe(time.perf_counter() - arrived)
        return stats

    return app


class QueueFull(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def server_stats(stats: dict, prepared: PreparedRequest, queue_s: float) -> dict:
    """The engine's stats plus what the server knows: time queued and document tokens taken from caches."""
    stats = dict(stats)
    if "cached_tokens" not in stats:
        reused = prepared.selector.uses_cache
        stats["cached_tokens"] = stats.get("context_tokens", 0) - stats.get("recomputed_tokens", 0) if reused else 0
    stats["queue_s"] = queue_s
    return stats


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON, refused with 413 as soon as it grows past `limit` bytes (never buffered beyond it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
