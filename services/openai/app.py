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
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.common import tracing
from services.common.auth import ApiKeys
from services.common.call_record import CallRecord
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.metrics import Metrics
from services.common.request_context import RequestContext
from services.common.servicer import GenerationCore
from services.common.types import RAW_SCENARIO, Chunk, Generation
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


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=_dumps(body), status=status, headers=headers, content_type="application/json"
    )


class OpenAIFace:
    def __init__(
        self,
        core: GenerationCore,
        metrics: Metrics,
        settings: OpenAISettings,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._settings = settings
        self._api_keys = api_keys
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
        if self._api_keys is not None:
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
            return json.loads(raw), None
        except ValueError as exc:
            return None, invalid([FieldViolation("body", f"not valid JSON: {exc}")])

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
            if parsed.stream:
                return await self._stream(request, parsed, call, resolved, translated)
            result = await self._core.generate(
                parsed.generation, self._settings.request_timeout, resolved
            )
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
        call.finish("OK", tokens=result.tokens)
        # OpenAI leaves a matched stop sequence out of the text.
        text, _ = cut_at_stop(result.text, parsed.generation.parameters.stop)
        answer = responses.completion(
            kind, result, id=responses.new_id(kind), created=int(time.time()), text=text
        )
        return _json(answer if translated is None else build_response(answer, translated))

    async def _stream(
        self, request: web.Request, parsed: OpenAIRequest, call: CallRecord,
        resolved: RequestContext, translated: ResponsesRequest | None = None,
    ) -> web.StreamResponse:
        """Server-Sent Events. An error before the first event is a real HTTP
        status (raised to the caller); after it, an error event the SDKs raise."""
        events = self._core.generate_stream(
            parsed.generation, self._settings.request_timeout, resolved)
        try:
            # The first event proves the request valid, admitted and generating.
            event = await anext(events)
            shapes = responses.ChunkShapes(parsed.kind, resolved.model_label,
                                           parsed.include_usage)
            out = (SseWriter(request) if translated is None
                   else ResponsesWriter(request, translated, resolved.model_label))
            await out.start()
            stops = StopFilter(parsed.generation.parameters.stop)
            await self._relay(events, event, shapes, out, call, stops)
            return out.response
        finally:
            # Stops the generation behind it when the client has gone.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    async def _relay(
        self,
        events: AsyncIterator[Chunk | Generation],
        event: Chunk | Generation,
        shapes: responses.ChunkShapes,
        out: SseWriter,
        call: CallRecord,
        stops: StopFilter,
    ) -> None:
        sent = ""
        tokens = 0
        first = True
        timed = False
        try:
            while True:
                if isinstance(event, Chunk):
                    if (event.text or event.tool_calls) and not timed:
                        call.first_token()
                        timed = True
                    sent += event.text
                    tokens = event.tokens
                    # A matched stop sequence stays out of the text, streamed too.
                    text = stops.feed(event.text)
                    if first:
                        await out.send(shapes.first(text, event.tool_calls))
                        first = False
                    elif text or event.tool_calls:
                        await out.send(shapes.text(text, event.tool_calls))
                else:
                    # The final result repeats the whole text; anything the
                    # chunks did not carry goes out before the end.
                    rest = event.text[len(sent):] if event.text.startswith(sent) else ""
                    rest = stops.feed(rest) + stops.finish()
                    if first:
                        await out.send(shapes.first(rest))
                    elif rest:
                        await out.send(shapes.text(rest))
                    finals = [shapes.last(event)]
                    if shapes.include_usage:
                        finals.append(shapes.usage(event))
                    await out.send(*finals, done=True)
                    call.finish("OK", tokens=event.tokens)
                    return
                event = await anext(events)
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
