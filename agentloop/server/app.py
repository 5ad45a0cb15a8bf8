"""The HTTP side of `agentloop serve` (FastAPI on uvicorn): OpenAI routes, server-sent events, Prometheus metrics.

Handlers parse and validate the request, hand it to the engine (agentloop/server/engine.py) and relay what its
worker sends back; a client that disconnects cancels its turn. Every error, ours or the framework's, is an
OpenAI-style body with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from agentloop.server.engine import Engine, Turn
from agentloop.server.protocol import ApiError, ChatRequest, chunk, completion, completion_id, parse_request

DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="agentloop serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    statuses: dict[int, int] = {}

    app.add_middleware(_StatusCounter, statuses=statuses)

    @app.exception_handler(_Disconnected)
    async def disconnected(request: Request, exc: _Disconnected):
        return Response(status_code=499)  # nobody reads it: the client closed the connection (nginx's code)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}: this server has /v1/chat/completions, "
                        "/v1/models, /health and /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = ApiError(500, f"internal error: {type(exc).__name__}: {line}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": started,
                                            "owned_by": "agentloop"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != engine.model_name:
            raise _unknown_model(name, engine.model_name)
        return {"id": name, "object": "model", "created": started, "owned_by": "agentloop"}

    @app.get("/health")
    async def health():
        snap = engine.snapshot
        return {"status": "ok", "model": engine.model_name, "running": snap["running"], "waiting": snap["waiting"],
                "conversations": len(snap["conversations"]), "cache_bytes": snap["cache_bytes"],
                "cap_bytes": snap["cap_bytes"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine, statuses), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_request(await request.body())
        if body.model != engine.model_name:
            raise _unknown_model(body.model, engine.model_name)
        loop, items = asyncio.get_running_loop(), asyncio.Queue()
        turn = engine.submit(body, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        try:
            first = await _next(items, request, engine, turn)  # started, or an error (answered with its status)
        except BaseException:
            engine.cancel(turn)
            raise
        if first["kind"] == "error":
            raise first["error"]
        cid = completion_id()
        if body.stream:
            return StreamingResponse(_stream(cid, body, items, request, engine, turn), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while (item := await _next(items, request, engine, turn))["kind"] == "delta":
                pass
        except BaseException:
            engine.cancel(turn)
            raise
        if item["kind"] == "error":
            raise item["error"]
        return completion(cid, engine.model_name, item["message"], item["finish_reason"], item["usage"],
                          item["extension"])

    return app


def _unknown_model(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist: this server serves `{served}` (see /v1/models)",
                    param="model", code="model_not_found")


class _Disconnected(Exception):
    pass


class _StatusCounter:
    """ASGI middleware counting the statuses of chat completion responses (streams pass through untouched)."""

    def __init__(self, app, statuses: dict[int, int]):
        self.app, self.statuses = app, statuses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)

        async def counting(message):
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] = self.statuses.get(message["status"], 0) + 1
            await send(message)

        await self.app(scope, receive, counting)


async def _next(items: asyncio.Queue, request: Request, engine: Engine, turn: Turn) -> dict:
    """The turn's next item; a client that disconnected meanwhile cancels the turn."""
    while True:
        try:
            return await asyncio.wait_for(items.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                engine.cancel(turn)
                raise _Disconnected from None


async def _stream(cid: str, body: ChatRequest, items: asyncio.Queue, request: Request, engine: Engine,
                  turn: Turn) -> AsyncIterator[str]:
    """Server-sent events: the role, content deltas, the tool calls, the finish (with the `agentloop` object),
    usage if asked, [DONE]. Text is held back while it could still be the start of a stop string; with tools
    the reply is sent whole at the end, once its calls are parsed out."""
    model = engine.model_name
    hold = max((len(s) for s in body.stop), default=1) - 1
    buffered = bool(body.tools) and body.tool_choice != "none"
    text, sent = "", 0
    try:
        yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
        while (item := await _next(items, request, engine, turn))["kind"] == "delta":
            text += item["text"]
            end = min([len(text) - hold] + [text.find(s) for s in body.stop if s in text])
            if not buffered and end > sent:
                yield _sse(chunk(cid, model, {"content": text[sent:end]}))
                sent = end
        if item["kind"] == "error":
            error = item["error"]
            yield _sse(error.body())
            return
        message = item["message"]
        content = message.get("content") or ""
        if len(content) > sent:
            yield _sse(chunk(cid, model, {"content": content[sent:]}))
        for index, call in enumerate(message.get("tool_calls") or []):
            yield _sse(chunk(cid, model, {"tool_calls": [{"index": index, **call}]}))
        yield _sse(chunk(cid, model, {}, item["finish_reason"], agentloop=item["extension"]))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(chunk(cid, model, None, usage=item["usage"], agentloop=item["extension"]))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit, _Disconnected):
        engine.cancel(turn)
        raise


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def prometheus(engine: Engine, statuses: dict[int, int]) -> str:
    """The Prometheus text format: counters, gauges, and cache bytes per held conversation."""
    snap, counters = engine.snapshot, engine.counters
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP agentloop_{name} {help_text}", f"# TYPE agentloop_{name} {kind}"])
        lines.extend(f"agentloop_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "chat completion requests answered, by HTTP status",
           [(f'{{status="{code}"}}', n) for code, n in sorted(statuses.items())] or [("", 0)])
    metric("turns_total", "counter", "turns that ran to their end", [("", counters.requests)])
    metric("turns_cancelled_total", "counter", "turns stopped because the client went away", [("", counters.cancelled)])
    metric("turns_timed_out_total", "counter", "requests answered 503 after waiting for room", [("", counters.timed_out)])
    metric("turns_failed_total", "counter", "turns that ended with an error", [("", counters.failed)])
    metric("prompt_tokens_total", "counter", "context tokens of the requests (held + new)", [("", counters.prompt_tokens)])
    metric("prefill_tokens_total", "counter", "tokens actually prefilled (new turns only when warm)",
           [("", counters.prefill_tokens)])
    metric("cached_tokens_total", "counter", "tokens a warm session already held", [("", counters.cached_tokens)])
    metric("completion_tokens_total", "counter", "tokens generated", [("", counters.completion_tokens)])
    metric("decode_seconds_total", "counter", "seconds spent decoding", [("", round(counters.decode_seconds, 6))])
    metric("tokens_per_second", "gauge", "decode speed of the latest turn", [("", round(counters.last_tokens_per_second, 3))])
    metric("compactions_total", "counter", "policy actions (compactions) during turns", [("", counters.compactions)])
    pool = snap["pool"]
    metric("idle_compactions_total", "counter", "idle sessions compacted to make room", [("", pool["idle_compactions"])])
    metric("parked_total", "counter", "sessions parked to disk", [("", pool["parked"])])
    metric("restored_total", "counter", "parked sessions loaded back", [("", pool["restored"])])
    metric("lost_total", "counter", "parked sessions that could not be loaded back", [("", pool["lost"])])
    metric("running", "gauge", "turns running", [("", snap["running"])])
    metric("waiting", "gauge", "requests waiting for room", [("", snap["waiting"])])
    held = snap["conversations"]
    metric("conversations", "gauge", "conversations held, by where",
           [('{where="memory"}', sum(b is not None for b, _ in held.values())),
            ('{where="disk"}', sum(b is None for b, _ in held.values()))])
    metric("cache_bytes", "gauge", "cache bytes per conversation held in memory",
           [(f'{{conversation="{cid}"}}', b) for cid, (b, _) in sorted(held.items()) if b is not None])
    metric("cache_bytes_total", "gauge", "cache bytes of all sessions", [("", snap["cache_bytes"])])
    metric("counted_bytes", "gauge", "bytes counted against the cap (running sessions at their cap)",
           [("", snap["counted_bytes"])])
    metric("peak_cache_bytes", "gauge", "most cache bytes held at once", [("", snap["peak_bytes"])])
    metric("peak_counted_bytes", "gauge", "most bytes counted against the cap at once",
           [("", pool["peak_counted_bytes"])])
    metric("cap_bytes", "gauge", "the server's memory cap", [("", snap["cap_bytes"])])
    return "\n".join(lines) + "\n"
