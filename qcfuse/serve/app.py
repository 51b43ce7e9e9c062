"""The OpenAI-compatible HTTP API over one FusionEngine: chat and text completions (plain and SSE), models,
health, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import FusionEngine
from ..errors import QcfuseError
from ..fusion import DEFAULT_METHOD, DEFAULT_RATIO, make_selector
from .metrics import ServerMetrics
from .schema import MAX_BODY_BYTES, APIError, CompletionRequest, Replies, error_body, fusion_stats, parse_request
from .worker import EngineWorker, PreparedRequest, prepare

log = logging.getLogger("qcfuse.serve")
MAX_QUEUE = 64            # requests waiting for the engine before new ones get 429
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: FusionEngine, model_name: str, method: str = DEFAULT_METHOD, ratio: float = DEFAULT_RATIO,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE, api_key: str | None = None,
               auth_all_routes: bool = False) -> FastAPI:
    """An app serving `engine` as model `model_name`. `method`/`ratio` apply when a request names no fusion;
    bodies over `max_body_bytes` are refused with 413; with `max_queue` requests already waiting for the
    engine, a new one is refused with 429 and a Retry-After estimate (clients back off instead of piling up).
    With `api_key`, every /v1 route (every route with `auth_all_routes`) wants `Authorization: Bearer KEY`."""
    make_selector(method, ratio)              # a bad default fails at start-up, not on the first request
    if max_queue < 1:
        raise QcfuseError("--max_queue must be at least 1")
    worker = EngineWorker(engine)
    # requests admitted but not yet holding the engine: still arriving (body, tokenizing) or waiting for their
    # turn; and a running estimate of the time one request holds the engine
    queue = {"arriving": 0, "waiting": 0, "service_s": 1.0}
    metrics = ServerMetrics()
    metrics.queue_depth.set_function(lambda: queue["arriving"] + queue["waiting"])
    metrics.running.set_function(lambda: 1 if worker.turn().locked() else 0)
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

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        path = request.url.path
        if api_key is None or not (auth_all_routes or path == "/v1" or path.startswith("/v1/")):
            return await call_next(request)
        if not _authorized(request.headers.get("authorization"), api_key):
            return error_response(401, error_body("missing or wrong API key: send 'Authorization: Bearer KEY' with "
                                                  "the key the server was started with", code="invalid_api_key"),
                                  {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        """"ok", or "degraded" with the reasons while a configured tier cannot be used (the server still
        answers from the other tiers, so it stays 200)."""
        problems = await asyncio.to_thread(engine.store.health)
        return {"status": "degraded" if problems else "ok", "model": model_name, "problems": problems}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "qcfuse"}]}

    @app.get("/metrics")
    async def prometheus():
        def render():
            metrics.observe_store(engine.store.stats())
            return metrics.render()
        return Response(await asyncio.to_thread(render), media_type=CONTENT_TYPE_LATEST)

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
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "text")

    async def complete(request: Request, route: str):
        arrived = time.perf_counter()
        metrics.requests.labels(route=route).inc()
        admit()
        try:
            asked = parse_request(route, await _read_json(request, max_body_bytes), model_name, method, ratio)
            prepared = await worker.run(prepare, engine, asked)
        finally:        # from here it counts as waiting (engine_turn), with no await in between
            queue["arriving"] -= 1
        replies = Replies(route, model_name, engine.model.fingerprint, asked.include_usage)
        if asked.stream:
            return StreamingResponse(stream_events(asked, prepared, replies, arrived),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        with metrics.in_flight.track_inprogress():
            async with engine_turn():
                queue_s = time.perf_counter() - arrived
                if await request.is_disconnected():        # left while queued: do not generate for nobody
                    metrics.disconnects.inc()
                    return Response(status_code=499)
                gen = await worker.run(engine.generate_layout, prepared.layout, prepared.selector, asked.max_tokens,
                                       None, asked.sampling, route == "chat")
        stats = record(gen.stats, queue_s, arrived)
        return JSONResponse(replies.body(gen.choices, stats))

    async def stream_events(asked: CompletionRequest, prepared: PreparedRequest, replies: Replies, arrived: float):
        """SSE chunks of the answers, one after the other (`index` tells them apart). Holding the turn across
        yields means a slow reader slows only its own request's turn; a client that leaves cancels this
        generator and frees the turn at the next token."""
        try:
            with metrics.in_flight.track_inprogress():
                async with engine_turn():
                    queue_s = time.perf_counter() - arrived
                    answers = await worker.run(engine.start, prepared.layout, prepared.selector, asked.max_tokens,
                                               asked.sampling, None, asked.route == "chat")
                    for index in range(answers.n):
                        decoding = answers.next()
                        if asked.route == "chat":
                            yield _event(replies.chunk(index, role=True))
                        while not decoding.finished:
                            text = await worker.run(decoding.step)
                            if text:
                                yield _event(replies.chunk(index, text, decoding.take_logprobs()))
                        last = replies.chunk(index, finish_reason=decoding.finish_reason)
                        if index == answers.n - 1:
                            stats = record(answers.stats, queue_s, arrived)
                            if not asked.include_usage:       # qcfuse's stats ride on the last chunk
                                last["fusion"] = fusion_stats(stats)
                        yield _event(last)
            if asked.include_usage:
                yield _event(replies.usage_chunk(stats))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            metrics.disconnects.inc()
            raise
        except Exception as exc:                 # the 200 header is already out: report in-band, as OpenAI does
            log.exception("streamed request failed")
            metrics.errors.labels(status="500").inc()
            yield _event(error_body(f"internal error: {type(exc).__name__}", "server_error", code="internal_error"))
            yield "data: [DONE]\n\n"

    def record(stats: dict, queue_s: float, arrived: float) -> dict:
        """Count one answered request in the metrics; its stats as the client sees them (plus time queued)."""
        stats = {**stats, "queue_s": queue_s}
        metrics.observe(stats)
        metrics.latency.observe(time.perf_counter() - arrived)
        return stats

    return app


class QueueFull(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _authorized(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode("utf-8", "surrogatepass"),
                                                                 api_key.encode("utf-8", "surrogatepass"))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


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
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
