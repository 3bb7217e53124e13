"""The OpenAI-compatible HTTP face: thin aiohttp handlers over the same
transport-free core the router's gRPC servicer uses.

Each request is kept in the same books as a gRPC call (services.common.call_record:
requests, latency, time to first token, errors by reason, one log line),
checked against the same API keys, bounded by the same request timeout, and
cancelled with everything behind it when its client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from services.common import tracing
from services.common.auth import ApiKeys
from services.common.call_record import CallRecord
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.metrics import Metrics
from services.common.parameters import MAX_SEED
from services.common.request_context import RequestContext
from services.common.servicer import GenerationCore
from services.common.types import RAW_SCENARIO, Chunk, Generation, GenerationRequest
from services.common.validation import RESUME_HEADER, resume_policy
from services.openai import responses
from services.openai.errors import error_reply
from services.openai.requests import Kind, OpenAIRequest, parse_chat, parse_completion
from services.openai.responses_api import (
    ResponsesRequest,
    build_response,
    in_responses_terms,
    translate_request,
)
from services.openai.responses_writer import ResponsesWriter
from services.openai.sse import SseWriter
from services.openai.stop_filter import StopFilter, cut_at_stop
from services.tenancy.caller import Callers
from services.tenancy.priority import HEADER as PRIORITY_HEADER

log = logging.getLogger("llmmesh.openai")

MAX_BODY_BYTES = 1024 * 1024
INTERNAL_MESSAGE = "internal error; see the service log"

ROUTES = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
)


@dataclass(frozen=True)
class OpenAISettings:
    host: str = "127.0.0.1"
    port: int = 0
    # Seconds a generation may take (the router's --timeout).
    request_timeout: float | None = 600.0
    grace_seconds: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES
    # The router's --tls-* files: HTTPS, mutual with a CA, as its gRPC port.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def choice_requests(parsed: OpenAIRequest) -> list[GenerationRequest]:
    """One generation per choice (`n`): the same request, a seeded one with
    seed, seed+1, ... so that its choices differ and each can be reproduced."""
    request = parsed.generation
    seed = request.parameters.seed
    if parsed.n == 1 or seed is None:
        return [request] * parsed.n
    return [
        request.evolve(parameters=replace(request.parameters, seed=(seed + i) % (MAX_SEED + 1)))
        for i in range(parsed.n)
    ]


def _top(parsed: OpenAIRequest) -> int | None:
    """Alternatives per token when the request asked for logprobs, else None."""
    params = parsed.generation.parameters
    return (params.top_logprobs or 0) if params.wants_logprobs else None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=_dumps(body), status=status, headers=headers, content_type="application/json"
    )


def lone_surrogate(body: Any) -> str | None:
    """The path of the first string (or key) in `body` that holds a lone
    surrogate, or None. Iterative: the body may nest deep."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return (path or "body").encode("utf-8", "backslashreplace").decode("ascii")
        elif isinstance(value, dict):
            for key, item in value.items():
                pending.append((f"{path}.{key}" if path else str(key), key))
                pending.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    """The headers tenancy reads, as gRPC metadata would carry them."""
    return [(k, request.headers[k]) for k in ("authorization", PRIORITY_HEADER)
            if k in request.headers]


def _ratelimit_headers(resolved: RequestContext) -> dict[str, str] | None:
    """OpenAI's x-ratelimit-* headers of the request's tenant (tenants on)."""
    caller = resolved.caller
    if caller is None or caller.admission is None:
        return None
    return caller.admission.headers()


class OpenAIFace:
    def __init__(
        self,
        core: GenerationCore,
        metrics: Metrics,
        settings: OpenAISettings,
        api_keys: ApiKeys | None = None,
        callers: Callers | None = None,
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._settings = settings
        self._api_keys = api_keys
        # With tenants: the key names the caller's tenant (services.tenancy).
        self._callers = callers
        # The `created` of every model object: when this face started.
        self._created = int(time.time())

    def app(self) -> web.Application:
        # Bodies a little over the limit still reach the handler, which refuses
        # them in OpenAI's shape; Envoy's own limit answers first anyway.
        app = web.Application(
            client_max_size=self._settings.max_body_bytes + 1,
            # A span per generation, joined to the caller's traceparent, while tracing is on.
            middlewares=tracing.http_server_middlewares(),
        )
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses_api)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    # -- routes ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def responses_api(self, request: web.Request) -> web.StreamResponse:
        """The Responses API, translated to and from a chat completion."""
        return await self._generate(request, "chat", responses_api=True)

    async def models(self, request: web.Request) -> web.StreamResponse:
        async def answer() -> dict[str, Any]:
            return responses.model_list(await self._core.list_models(), self._created)

        return await self._unary(request, "ListModels", "", answer)

    async def model(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model"]

        async def answer() -> dict[str, Any]:
            return responses.model(await self._core.get_model(model_id), self._created)

        return await self._unary(request, "GetModel", model_id, answer)

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        error = MeshError(
            Reason.ROUTE_NOT_FOUND,
            f"unknown route {request.method} {request.path}; this server serves "
            + ", ".join(f"{m} {p}" for m, p in ROUTES)
            + "; the mesh's native API: POST /v1/generate, POST /v1/generate_stream, "
            "GET /v1/mesh/models",
        )
        return self._error(error)

    # -- helpers ---------------------------------------------------------------

    def _record(
        self, request: web.Request, method: str, resolved: RequestContext
    ) -> CallRecord:
        return CallRecord(
            self._metrics, method, resolved.model_label, resolved.scenario,
            peer=lambda: f"{request.remote or ''}",
            fields={"api": "openai", "route": request.path},
        )

    def _authenticate(self, request: web.Request) -> None:
        if self._callers is not None:
            self._callers.resolve(_metadata(request))
        elif self._api_keys is not None:
            header = request.headers.get("Authorization")
            self._api_keys.check([("authorization", header)] if header is not None else [])

    def _error(self, error: MeshError, parsed: OpenAIRequest | None = None) -> web.Response:
        reply = error_reply(error, parsed)
        return _json(reply.body, reply.status, reply.headers)

    def _unexpected(self, call: CallRecord, exc: Exception) -> web.Response:
        log.error("unhandled error", exc_info=exc)
        error = MeshError(Reason.INTERNAL, INTERNAL_MESSAGE)
        call.finish(error.code, reason=error.reason, message=str(exc))
        return self._error(error)

    async def _unary(
        self, request: web.Request, method: str, model: str,
        answer: Callable[[], Awaitable[dict[str, Any]]],
    ) -> web.StreamResponse:
        call = self._record(request, method, self._core.resolve(model, ""))
        try:
            self._authenticate(request)
            body = await answer()
        except MeshError as exc:
            call.finish(exc.code, reason=exc.reason, message=exc.message)
            return self._error(exc)
        except asyncio.CancelledError:
            call.finish("CANCELLED", reason=Reason.CANCELLED)
            raise
        except Exception as exc:
            return self._unexpected(call, exc)
        call.finish("OK")
        return _json(body)

    async def _body(self, request: web.Request) -> tuple[Any, MeshError | None]:
        """The JSON body, or the error that refuses it (raised after auth)."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self._settings.max_body_bytes
            return None, MeshError(
                Reason.REQUEST_TOO_LARGE, f"request body larger than {limit} bytes",
                metadata={"limit_bytes": str(limit)},
            )
        try:
            body = json.loads(raw)
        except RecursionError:
            return None, invalid([FieldViolation("body", "JSON nested too deeply")])
        except ValueError as exc:
            return None, invalid([FieldViolation("body", f"not valid JSON: {exc}")])
        # A \ud800-style escape decodes to a lone surrogate, which no UTF-8
        # text (the engines', the logs', protobuf's) can carry.
        where = lone_surrogate(body) if b"\\u" in raw or b"\\U" in raw else None
        if where is not None:
            return None, invalid([FieldViolation(
                where, "contains a lone UTF-16 surrogate (\\ud800-\\udfff): not valid text"
            )])
        return body, None

    async def _generate(self, request: web.Request, kind: Kind,
                        responses_api: bool = False) -> web.StreamResponse:
        body, refused = await self._body(request)
        fields = body if isinstance(body, dict) else {}
        model = fields.get("model")
        method = "GenerateStream" if fields.get("stream") is True else "Generate"
        # The one lookup of the request's model, read by the books, the core
        # and the reply.
        resolved = self._core.resolve(
            model if isinstance(model, str) else "",
            RAW_SCENARIO if kind == "completion" else "",
        )
        call = self._record(request, method, resolved)
        parsed: OpenAIRequest | None = None
        translated: ResponsesRequest | None = None
        try:
            if self._callers is not None:
                tier = fields.get("service_tier")
                caller = self._callers.resolve(
                    _metadata(request), tier if tier is None or isinstance(tier, str)
                    else str(tier))
                resolved = dataclasses.replace(
                    resolved, caller=caller, tenant=caller.tenant.name)
            else:
                self._authenticate(request)
            if refused is not None:
                raise refused
            if responses_api:
                translated = translate_request(body)
                try:
                    parsed = parse_chat(translated.chat)
                except MeshError as exc:
                    raise in_responses_terms(exc) from None
            else:
                parsed = parse_chat(body) if kind == "chat" else parse_completion(body)
            header = request.headers.get(RESUME_HEADER)
            if header is not None:
                parsed = replace(
                    parsed, generation=parsed.generation.evolve(resume=resume_policy(header))
                )
            if parsed.stream:
                return await self._stream(request, parsed, call, resolved, translated)
            results = await self._generate_choices(parsed, resolved)
        except MeshError as exc:
            call.finish(exc.code, reason=exc.reason, message=exc.message)
            return self._error(exc, parsed)
        except asyncio.CancelledError:
            if not call.finished:  # a stream that had started kept its own books
                call.finish("CANCELLED", reason=Reason.CANCELLED)
            raise
        except ConnectionResetError:  # the client left as the stream's headers went out
            if not call.finished:
                call.finish("CANCELLED", reason=Reason.CANCELLED)
            return web.Response(status=499)
        except Exception as exc:
            return self._unexpected(call, exc)
        call.finish("OK", tokens=sum(r.tokens for r in results))
        # OpenAI leaves a matched stop sequence out of the text.
        stop = parsed.generation.parameters.stop
        answer = responses.completions(
            kind, results, id=responses.new_id(kind), created=int(time.time()),
            top=_top(parsed), texts=[cut_at_stop(r.text, stop)[0] for r in results],
        )
        return _json(answer if translated is None else build_response(answer, translated),
                     headers=_ratelimit_headers(resolved))

    async def _generate_choices(
        self, parsed: OpenAIRequest, resolved: RequestContext
    ) -> list[Generation]:
        """The choices of a request, generated concurrently; the first failure
        (or the client leaving) cancels the others."""
        timeout = self._settings.request_timeout
        tasks = [
            asyncio.ensure_future(self._core.generate(r, timeout, resolved))
            for r in choice_requests(parsed)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(
        self, request: web.Request, parsed: OpenAIRequest, call: CallRecord,
        resolved: RequestContext, translated: ResponsesRequest | None = None,
    ) -> web.StreamResponse:
        """Server-Sent Events. An error before the first event is a real HTTP
        status (raised to the caller); after it, an error event the SDKs raise."""
        streams = [
            self._core.generate_stream(r, self._settings.request_timeout, resolved)
            for r in choice_requests(parsed)
        ]
        merged = _merge(streams)
        try:
            # The first event proves the request valid, admitted and generating.
            index, event = await anext(merged)
            shapes = responses.ChunkShapes(parsed.kind, resolved.model_label,
                                           parsed.include_usage, _top(parsed))
            out = (SseWriter(request) if translated is None
                   else ResponsesWriter(request, translated, resolved.model_label))
            limits = _ratelimit_headers(resolved)
            if limits:
                out.response.headers.update(limits)
            await out.start()
            stops = [StopFilter(parsed.generation.parameters.stop) for _ in streams]
            await self._relay(merged, index, event, shapes, out, call, stops)
            return out.response
        finally:
            # Stops the generations behind it when the client has gone.
            await merged.aclose()

    async def _relay(
        self,
        events: AsyncIterator[tuple[int, Chunk | Generation]],
        index: int,
        event: Chunk | Generation,
        shapes: responses.ChunkShapes,
        out: SseWriter,
        call: CallRecord,
        stops: list[StopFilter],
    ) -> None:
        """Relay the events of the choices (each tagged with its index; one stop
        filter each) as chunks."""
        n = len(stops)
        timed = False
        sent = [""] * n
        counts = [0] * n
        first = [True] * n
        results: list[Generation] = []
        tokens = 0
        try:
            while True:
                if isinstance(event, Chunk):
                    if (event.text or event.tool_calls) and not timed:
                        call.first_token()
                        timed = True
                    offset = len(sent[index])
                    sent[index] += event.text
                    counts[index] = event.tokens
                    tokens = sum(counts)
                    # A matched stop sequence stays out of the text, streamed too.
                    text = stops[index].feed(event.text)
                    if first[index]:
                        await out.send(shapes.first(text, index, event.logprobs,
                                                    event.tool_calls))
                        first[index] = False
                    elif text or event.tool_calls or event.logprobs:
                        await out.send(shapes.text(text, index, event.logprobs, offset,
                                                   event.tool_calls))
                else:
                    # The final result repeats the whole text; anything the
                    # chunks did not carry goes out before the end.
                    done = sent[index]
                    rest = event.text[len(done):] if event.text.startswith(done) else ""
                    rest = stops[index].feed(rest) + stops[index].finish()
                    if first[index]:
                        await out.send(shapes.first(rest, index))
                    elif rest:
                        await out.send(shapes.text(rest, index))
                    results.append(event)
                    finals = [shapes.last(event, index)]
                    if len(results) == n:
                        if shapes.include_usage:
                            finals.append(shapes.usage(results))
                        await out.send(*finals, done=True)
                        call.finish("OK", tokens=sum(r.tokens for r in results))
                        return
                    await out.send(*finals)
                index, event = await anext(events)
        except StopAsyncIteration:
            error = MeshError(Reason.INCOMPLETE_GENERATION, "the stream ended without a result")
        except MeshError as exc:
            error = exc
        except asyncio.CancelledError:
            call.finish("CANCELLED", reason=Reason.CANCELLED, tokens=tokens)
            raise
        except ConnectionResetError:  # the client left between two writes
            call.finish("CANCELLED", reason=Reason.CANCELLED, tokens=tokens)
            return
        except Exception as exc:
            log.error("unhandled error in a stream", exc_info=exc)
            error = MeshError(Reason.INTERNAL, INTERNAL_MESSAGE)
        call.finish(error.code, reason=error.reason, message=error.message, tokens=tokens)
        # The 200 is gone: the error is the stream's last event, which the SDKs raise.
        with contextlib.suppress(ConnectionResetError):
            await out.send_error(error)


async def _merge(
    streams: list[AsyncIterator[Chunk | Generation]],
) -> AsyncGenerator[tuple[int, Chunk | Generation], None]:
    """The events of several streams as they come, each with its stream's
    index; the first error ends them all, and closing this closes every one."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            close = getattr(streams[0], "aclose", None)
            if close is not None:
                await close()
        return
    queue: asyncio.Queue[tuple[int, Chunk | Generation | BaseException | None]] = (
        asyncio.Queue()
    )

    async def pump(i: int, events: AsyncIterator[Chunk | Generation]) -> None:
        try:
            async for event in events:
                await queue.put((i, event))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
