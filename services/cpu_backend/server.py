"""TGI's HTTP API over any `Engine`: the app factory `create_app`.

Routes and behaviour mirror TGI's router (router/src/server.rs):

* POST `/` (compat: JSON array of one GenerateResponse, or SSE when
  `"stream": true`), `/generate`, `/generate_stream`, `/tokenize`;
* GET `/`, `/health`, `/ping` (200 empty / 503 healthcheck), `/info`,
  `/metrics`, `/v1/models`.

Order of checks per generation request, as in TGI: parse the body (axum's
rejections), count the request, checks that precede admission (best_of,
streaming-only rules), take a concurrency permit (429 `overloaded` when all
`max_concurrent_requests` are taken - no queueing), validate (422), then
generate. On the streaming routes TGI has already sent `200` and the SSE
headers when it validates, so validation and overload errors arrive IN-BAND
as `data:{"error":...,"error_type":...}`, exactly like every later error.

Every generation runs in its own task feeding a queue; the request handler
drains the queue and watches its connection. When the client goes away
(handler cancelled, write failed, or transport seen closing while idle) the
generation task is cancelled, which closes the engine's token iterator, and
`tgi_request_failure{err="dropped"}` is incremented.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from services.common import tracing
from services.cpu_backend.engine import Engine, EngineError, Token
from services.cpu_backend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from services.cpu_backend.metrics import Metrics
from services.cpu_backend.protocol import (
    BodyError,
    GenerateRequest,
    Generation,
    InferError,
    Validator,
    ValidRequest,
    dumps,
    generate_response,
    parse_request,
    stream_event,
    tokenize_response,
)
from services.cpu_backend.settings import ServerSettings

access_logger = logging.getLogger("llmmesh.cpu_backend.access")
logger = logging.getLogger("llmmesh.cpu_backend.server")

# Health probes and metrics scrapes, logged only at debug level when they succeed.
PROBE_PATHS: Final = frozenset({"/", "/health", "/ping", "/metrics"})
# Request-scoped dict of fields for the one access-log line per request.
LOG_FIELDS: Final = web.RequestKey("llmmesh.log_fields", dict)
_KEEP_ALIVE: Final = b":\n\n"


class ClientGone(Exception):
    """The client closed its connection before the reply was complete."""


class ConcurrencyLimiter:
    """TGI's semaphore with try_acquire: never waits, the caller answers 429."""

    def __init__(self, capacity: int) -> None:
        # Mutable on purpose: the test double shrinks it to 0 to force 429s.
        self.capacity = capacity
        self.in_use = 0

    def try_acquire(self) -> bool:
        if self.in_use >= self.capacity:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1


@dataclass
class Clock:
    """TGI's timestamps of one request (monotonic seconds)."""

    start: float
    # Validation finished, request entered the queue.
    queued: float | None = None
    # The engine started working on it.
    started: float | None = None

    def mark_started(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def timings(self, generated_tokens: int) -> dict[str, float]:
        end = time.monotonic()
        queued = self.queued if self.queued is not None else end
        started = self.started if self.started is not None else queued
        inference = end - started
        return {
            "total": end - self.start,
            "validation": queued - self.start,
            "queue": started - queued,
            "inference": inference,
            "per_token": inference / max(generated_tokens, 1),
        }


def _stop_hit(text: str, added: int, stops: tuple[str, ...]) -> bool:
    """TGI's StopSequenceCriteria, for a stop that ends inside the newest text."""
    for stop in stops:
        # TGI compiles `re.escape(stop) + "$"`; for "" that matches at once.
        if not stop:
            return True
        if added and stop in text[-(added + len(stop) - 1) :]:
            return True
    return False


class TgiCore:
    """Admission, validation, generation and metrics of one served model.

    Knows nothing about aiohttp: the routes hand it callbacks to emit events
    and to ask whether the client is still there.
    """

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
        )
        self.limiter = ConcurrencyLimiter(settings.max_concurrent_requests)
        self.validator = Validator(settings, engine.tokenize)
        # Set on SIGTERM: /health turns 503 while in-flight requests finish.
        self.draining = False
        self._running_tokens = 0

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_id": s.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": s.max_best_of,
            "max_stop_sequences": s.max_stop_sequences,
            "max_input_tokens": s.max_input_tokens,
            "max_total_tokens": s.max_total_tokens,
            "validation_workers": s.validation_workers,
            "max_client_batch_size": s.max_client_batch_size,
            "router": s.router,
            "version": s.version,
            "sha": None,
            "docker_label": None,
        }

    async def healthy(self) -> bool:
        return not self.draining and await self.engine.health()

    def admit(self, request: GenerateRequest, *, stream: bool) -> None:
        """Checks before a permit, then the permit; the caller must `release()`.

        Like every TgiCore step, failures are counted here, once, by their
        error-table label; callers only render them.
        """
        try:
            self.validator.check_before_admission(request.parameters, stream=stream)
            if not self.limiter.try_acquire():
                raise InferError.overloaded()
        except InferError as exc:
            self.record_failure(exc)
            raise

    def release(self) -> None:
        self.limiter.release()

    async def validate(self, request: GenerateRequest, *, compat: bool) -> ValidRequest:
        default_full_text = self.settings.compat_return_full_text if compat else False
        try:
            valid = await self.validator.validate(
                request, default_return_full_text=default_full_text
            )
        except InferError as exc:
            self.record_failure(exc)
            raise
        self.metrics.input_length.observe(valid.input_length)
        self.metrics.max_new_tokens.observe(valid.max_new_tokens)
        return valid

    def record_failure(self, error: InferError) -> None:
        self.metrics.failure(error.spec.metric_label)

    def record_success(self, clock: Clock, gen: Generation) -> dict[str, float]:
        t = clock.timings(len(gen.tokens))
        m = self.metrics
        m.success()
        m.request_duration.observe(t["total"])
        m.validation_duration.observe(t["validation"])
        m.queue_duration.observe(t["queue"])
        m.inference_duration.observe(t["inference"])
        m.mean_time_per_token.observe(t["per_token"])
        m.generated_tokens.observe(len(gen.tokens))
        return t

    async def _events(
        self, valid: ValidRequest, clock: Clock
    ) -> AsyncIterator[tuple[Token, int, Generation | None]]:
        """Engine tokens with TGI's stopping criteria: (token, index, final-or-None)."""
        gen = Generation()
        m = self.metrics
        budget = valid.input_length + valid.sampling.max_new_tokens
        m.queue_size.inc()
        state = {"queued": True}

        def on_start() -> None:
            clock.mark_started()
            if state["queued"]:
                state["queued"] = False
                m.queue_size.dec()
                m.batch_current_size.inc()
                self._running_tokens += budget
                m.batch_current_max_tokens.set(self._running_tokens)

        tokens = self.engine.generate_tokens(valid.input_ids, valid.sampling, on_start=on_start)
        try:
            async for token in tokens:
                on_start()  # for engines that never call it
                gen.tokens.append(token)
                index = len(gen.tokens)
                added = 0
                if not token.special:
                    gen.text += token.text
                    added = len(token.text)
                # TGI's StoppingCriteria order: length, then EOS, then stop.
                if index >= valid.sampling.max_new_tokens:
                    gen.finish_reason = "length"
                elif token.eos:
                    gen.finish_reason = "eos_token"
                elif valid.stop and _stop_hit(gen.text, added, valid.stop):
                    gen.finish_reason = "stop_sequence"
                else:
                    yield token, index, None
                    continue
                yield token, index, gen
                return
        finally:
            # Closing the engine's iterator is what stops the model: on a stop
            # sequence here, on cancellation when the client went away.
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
            if state["queued"]:
                m.queue_size.dec()
            else:
                m.batch_current_size.dec()
                self._running_tokens -= budget
                m.batch_current_max_tokens.set(self._running_tokens)
        # The engine stopped without EOS, stop sequence or length.
        raise InferError.incomplete(stream=False)

    async def _produce(self, valid: ValidRequest, clock: Clock, queue: asyncio.Queue) -> None:
        try:
            async for item in self._events(valid, clock):
                queue.put_nowait(item)
        except InferError as exc:
            queue.put_nowait(exc)
        except EngineError as exc:
            queue.put_nowait(InferError.generation(str(exc)))
        except Exception as exc:
            logger.exception("engine failed")
            queue.put_nowait(InferError.generation(f"{type(exc).__name__}: {exc}"))

    async def drive(
        self,
        valid: ValidRequest,
        clock: Clock,
        on_event: Callable[[Token, int, Generation | None], Awaitable[None]],
        client_gone: Callable[[], bool],
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> Generation:
        """Run one generation to its end, or until the client disappears.

        Raises InferError for generation/incomplete errors (already counted)
        and ClientGone (or CancelledError) when the client left (counted as
        dropped). In every case the generation task is cancelled on exit.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(valid, clock, queue))
        poll = self.settings.disconnect_poll_interval
        next_check = time.monotonic() + poll
        try:
            while True:
                # Checked on a clock, not only when idle: a unary request whose
                # tokens keep coming writes nothing that could fail.
                now = time.monotonic()
                if now >= next_check:
                    if client_gone():
                        raise ClientGone()
                    next_check = now + poll
                if queue.empty():
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=next_check - now)
                    except TimeoutError:
                        if on_idle is not None:
                            await on_idle()
                        continue
                else:
                    item = queue.get_nowait()
                if isinstance(item, InferError):
                    self.record_failure(item)
                    raise item
                token, index, final = item
                await on_event(token, index, final)
                if final is not None:
                    return final
        except (ClientGone, ConnectionError, asyncio.CancelledError):
            self.metrics.failure("dropped")
            raise
        finally:
            # Cancelling the task closes the engine iterator at its current
            # await; the engine then stops at its next token.
            producer.cancel()
            await asyncio.wait({producer}, timeout=1.0)


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
            core.admit(req, stream=False)
        except InferError as exc:
            log["error_type"] = exc.spec.error_type
            return _json(exc.spec.status, exc.body())
        try:
            valid = await core.validate(req, compat=compat)
            log["prompt_tokens"] = valid.input_length
            clock.queued = time.monotonic()

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
            core.release()
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
        body = generate_response(valid, gen, prefill)
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
