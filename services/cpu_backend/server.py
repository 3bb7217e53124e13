"""TGI's HTTP API over any `Engine`: routes, access log and the app factory `create_app`.

Routes and behaviour mirror TGI's router (router/src/server.rs):

* POST `/` (compat: JSON array of one GenerateResponse, or SSE when
  `"stream": true`), `/generate`, `/generate_stream`, `/tokenize`;
* GET `/`, `/health`, `/ping` (200 empty / 503 healthcheck), `/info`,
  `/metrics`, `/v1/models`.

Order of checks per generation request, as in TGI: parse the body (axum's
rejections), count the request, checks that precede admission (best_of,
streaming-only rules), take a concurrency permit (429 `overloaded` when all
`max_concurrent_requests` are taken; a permit covers waiting in the queue
and running in the batch), validate (422), then generate. On the streaming
routes TGI has already sent `200` and the SSE headers when it validates, so
validation and overload errors arrive IN-BAND as
`data:{"error":...,"error_type":...}`, exactly like every later error.

The handlers only decode and encode: admission, validation, stopping
criteria and metrics are `core.TgiCore`'s. When the client goes away
(handler cancelled, write failed, or transport seen closing while idle) the
generation is cancelled, which drops it from the engine's queue or batch, and
`tgi_request_failure{err="dropped"}` is incremented.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from services.common import tracing
from services.cpu_backend.core import ClientGone, Clock, TgiCore
from services.cpu_backend.engine import Engine, Token
from services.cpu_backend.errors import BodyError, InferError
from services.cpu_backend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from services.cpu_backend.responses import (
    Generation,
    dumps,
    generate_response,
    stream_event,
    tokenize_response,
)
from services.cpu_backend.schema import GenerateRequest, parse_request
from services.cpu_backend.settings import ServerSettings

access_logger = logging.getLogger("llmmesh.cpu_backend.access")

# Health probes and metrics scrapes, logged only at debug level when they succeed.
PROBE_PATHS: Final = frozenset({"/", "/health", "/ping", "/metrics"})
# Request-scoped dict of fields for the one access-log line per request.
LOG_FIELDS: Final = web.RequestKey("llmmesh.log_fields", dict)
_KEEP_ALIVE: Final = b":\n\n"


CORE: Final = web.AppKey("llmmesh.tgi_core", TgiCore)


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=dumps(obj), content_type="application/json", headers=headers
    )


def _sse(obj: Any) -> bytes:
    # TGI/axum framing: `data:` without a space, one blank line after each event.
    return b"data:" + dumps(obj) + b"\n\n"


def _client_gone(request: web.Request) -> Callable[[], bool]:
    def check() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return check


def _fields(request: web.Request) -> dict[str, Any]:
    fields: dict[str, Any] = request.get(LOG_FIELDS, {})
    return fields


class _Routes:
    """aiohttp handlers: decode the request, call TgiCore, encode the reply."""

    def __init__(self, core: TgiCore) -> None:
        self.core = core

    async def _read(self, request: web.Request, *, compat: bool = False) -> GenerateRequest:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            message = "Failed to buffer the request body: length limit exceeded"
            raise BodyError(413, message) from None
        return parse_request(body, request.headers.get("Content-Type", ""), compat=compat)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._read(request, compat=True)
        except BodyError as exc:
            return _json(exc.status, exc.body())
        if req.stream:
            return await self._stream(request, req, compat=True)
        return await self._unary(request, req, compat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._read(request)
        except BodyError as exc:
            return _json(exc.status, exc.body())
        return await self._unary(request, req, compat=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._read(request)
        except BodyError as exc:
            return _json(exc.status, exc.body())
        return await self._stream(request, req, compat=False)

    async def _unary(
        self, request: web.Request, req: GenerateRequest, *, compat: bool
    ) -> web.StreamResponse:
        core = self.core
        log = _fields(request)
        clock = Clock(start=time.monotonic())
        core.metrics.request()
        try:
            permits = core.admit(req, stream=False)
        except InferError as exc:
            log["error_type"] = exc.spec.error_type
            return _json(exc.spec.status, exc.body())
        try:
            valid = await core.validate(req, compat=compat)
            log["prompt_tokens"] = valid.input_length
            clock.queued = time.monotonic()
            others: list[tuple[Any, Generation]] = []
            if permits > 1:
                best, *others = await core.drive_best_of(
                    valid, permits, clock, _client_gone(request)
                )
                valid, gen = best
            else:

                async def ignore(_t: Token, _i: int, _f: Generation | None) -> None:
                    return None

                gen = await core.drive(valid, clock, ignore, _client_gone(request))
            prefill: list[dict[str, Any]] = []
            if valid.decoder_input_details:
                texts = await core.engine.token_texts(valid.input_ids)
                # The engine computes no prompt logprobs; TGI's first one is
                # null too, we leave all of them null rather than invent them.
                prefill = [
                    {"id": i, "text": t, "logprob": None}
                    for i, t in zip(valid.input_ids, texts, strict=True)
                ]
            t = core.record_success(clock, gen)
        except InferError as exc:
            log["error_type"] = exc.spec.error_type
            return _json(exc.spec.status, exc.body())
        except ClientGone:
            log["dropped"] = True
            # Nobody reads it; 499 (nginx's "client closed request") for the log.
            return web.Response(status=499)
        except asyncio.CancelledError:
            log["dropped"] = True
            raise
        finally:
            core.release(permits)
        log.update(generated_tokens=len(gen.tokens), finish_reason=gen.finish_reason)
        headers = {
            "x-compute-type": core.settings.compute_type,
            "x-compute-time": str(t["total"]),
            "x-compute-characters": str(len(req.inputs)),
            "x-total-time": str(int(t["total"] * 1000)),
            "x-validation-time": str(int(t["validation"] * 1000)),
            "x-queue-time": str(int(t["queue"] * 1000)),
            "x-inference-time": str(int(t["inference"] * 1000)),
            "x-time-per-token": str(int(t["per_token"] * 1000)),
            "x-prompt-tokens": str(valid.input_length),
            "x-generated-tokens": str(len(gen.tokens)),
        }
        body = generate_response(valid, gen, prefill, others)
        return _json(200, [body] if compat else body, headers)

    async def _stream(
        self, request: web.Request, req: GenerateRequest, *, compat: bool
    ) -> web.StreamResponse:
        core = self.core
        log = _fields(request)
        clock = Clock(start=time.monotonic())
        core.metrics.request()
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-compute-type": core.settings.compute_type,
                "x-compute-characters": str(len(req.inputs)),
                "X-Accel-Buffering": "no",
            },
        )
        last_write = time.monotonic()

        async def send(payload: bytes) -> None:
            nonlocal last_write
            await resp.write(payload)
            last_write = time.monotonic()

        async def keep_alive() -> None:
            if time.monotonic() - last_write >= core.settings.keep_alive_interval:
                await send(_KEEP_ALIVE)

        admitted = False
        try:
            # Like TGI, the 200 and headers go out before admission and validation.
            await resp.prepare(request)
            try:
                core.admit(req, stream=True)
                admitted = True
                valid = await core.validate(req, compat=compat)
                log["prompt_tokens"] = valid.input_length
                clock.queued = time.monotonic()

                async def on_event(token: Token, index: int, final: Generation | None) -> None:
                    event = stream_event(valid, index, token, final, req.parameters.details)
                    await send(_sse(event))

                gen = await core.drive(
                    valid, clock, on_event, _client_gone(request), on_idle=keep_alive
                )
                core.record_success(clock, gen)
                log.update(generated_tokens=len(gen.tokens), finish_reason=gen.finish_reason)
            except InferError as exc:
                if exc.kind == "incomplete_generation":
                    exc = InferError.incomplete(stream=True)
                log["error_type"] = exc.spec.error_type
                await send(_sse(exc.body()))
            await resp.write_eof()
        except (ClientGone, ConnectionError):
            log["dropped"] = True
        except asyncio.CancelledError:
            log["dropped"] = True
            raise
        finally:
            if admitted:
                core.release()
        return resp

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._read(request)
            ids = await self.core.validator.tokenize(req.inputs, req.parameters.truncate)
        except BodyError as exc:
            return _json(exc.status, exc.body())
        except InferError as exc:
            return _json(exc.spec.status, exc.body())
        texts = await self.core.engine.token_texts(ids)
        return _json(200, tokenize_response(req.inputs, ids, texts))

    async def health(self, request: web.Request) -> web.StreamResponse:
        if await self.core.healthy():
            return web.Response(status=200)
        return _json(503, {"error": "unhealthy", "error_type": "healthcheck"})

    async def info(self, request: web.Request) -> web.StreamResponse:
        return _json(200, self.core.info())

    async def models(self, request: web.Request) -> web.StreamResponse:
        model_id = self.core.settings.model_id
        data = [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]
        return _json(200, {"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.core.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )


@web.middleware
async def access_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One structured line per request, with what the handler learned."""
    started = time.monotonic()
    fields: dict[str, Any] = {}
    request[LOG_FIELDS] = fields
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        # Probes and scrapes come every few seconds: when they succeed they
        # are noise at info level; when they fail they are news.
        quiet = status == 200 and request.method == "GET" and request.path in PROBE_PATHS
        access_logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "request",
            extra={
                "fields": {
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    **fields,
                }
            },
        )


def create_app(engine: Engine, settings: ServerSettings) -> web.Application:
    """Build the TGI-compatible app for one engine. The caller owns the engine."""
    if settings.max_total_tokens > engine.context_length:
        raise ValueError(
            f"max_total_tokens ({settings.max_total_tokens}) exceeds the engine's "
            f"context length ({engine.context_length})"
        )
    core = TgiCore(engine, settings)
    routes = _Routes(core)
    app = web.Application(
        client_max_size=settings.payload_limit,
        middlewares=[*tracing.http_server_middlewares(), access_log],
    )
    app[CORE] = core
    app.router.add_post("/", routes.compat)
    app.router.add_post("/generate", routes.generate)
    app.router.add_post("/generate_stream", routes.generate_stream)
    app.router.add_post("/tokenize", routes.tokenize)
    app.router.add_get("/", routes.health, allow_head=False)
    app.router.add_get("/health", routes.health, allow_head=False)
    app.router.add_get("/ping", routes.health, allow_head=False)
    app.router.add_get("/info", routes.info, allow_head=False)
    app.router.add_get("/metrics", routes.metrics, allow_head=False)
    app.router.add_get("/v1/models", routes.models, allow_head=False)
    return app
