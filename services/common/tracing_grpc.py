"""gRPC tracing: a server span per GenerateService call, a client span per attempt.

Imported only while tracing is on (services.common.tracing).

Server side, the caller's `traceparent` metadata is the parent; the span is
named after the GenAI conventions (`chat qwen2`), carries the request's and
the reply's gen_ai.* attributes, a `first_token` event on streams, and the
error table's reason on failure, and it ends when the unary call or the
stream does. It stays the current span of the call's task, so outgoing calls
and log lines of the request carry its trace.

Client side, each call made under a current span gets a CLIENT span of its
own (one per attempt: a failover is a second span), and its context is sent
as `traceparent`. The server span learns the replica and the attempts.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from llmmesh.v1 import generate_pb2 as pb
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import request_context
from services.common.errors import MeshError, Reason
from services.common.method_interceptor import MethodInterceptor
from services.common.parameters import SPAN
from services.common.request_context import UNKNOWN
from services.common.servicer import DEADLINE_SLACK_SECONDS
from services.common.types import RAW_SCENARIO

SERVICE = pb.DESCRIPTOR.services_by_name["GenerateService"].full_name
_PREFIX = f"/{SERVICE}/"
# Calls traced even without a caller's trace: the generations. Model listings
# are traced only when they arrive with a trace (Envoy's, a client's).
_ALWAYS = frozenset({"Generate", "GenerateStream"})
_PROPAGATOR = TraceContextTextMapPropagator()
_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass
class _Attempts:
    """Calls made to replicas while serving one request."""

    count: int = 0
    replica: str = ""


_ATTEMPTS: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar(
    "llmmesh_attempts", default=None
)


def request_attributes(request: Any) -> dict[str, Any]:
    """gen_ai.* attributes of a GenerateRequest or GenerateStreamRequest."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _operation(request),
        "gen_ai.request.model": request.model_id,
    }
    if request.scenario:
        attrs["llmmesh.scenario"] = request.scenario
    # The proto's fields carry the parameter table's names.
    for fd, value in request.parameters.ListFields():
        attribute = SPAN.get(fd.name)
        if attribute is not None:
            attrs[attribute] = list(value) if fd.name == "stop" else value
    return attrs


def response_attributes(reply: Any) -> dict[str, Any]:
    """gen_ai.* attributes of a GenerateResponse or a stream's final message."""
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": reply.input_tokens,
        "gen_ai.usage.output_tokens": reply.tokens,
        "gen_ai.response.finish_reasons": [_FINISH.get(reply.finish_reason, "unspecified")],
    }
    if reply.model:
        attrs["gen_ai.response.model"] = reply.model
    return attrs


def _operation(request: Any) -> str:
    raw = request.scenario == RAW_SCENARIO and not request.messages
    return "text_completion" if raw else "chat"


def _set_error(span: Any, code: str, reason: str, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    span.set_attribute("error.type", reason)
    span.set_status(Status(StatusCode.ERROR, f"{reason}: {message}"[:512]))


class ServerTracing(MethodInterceptor):
    """A SERVER span per GenerateService call, parented by the caller's traceparent."""

    def __init__(self, tracer: Any) -> None:
        super().__init__()
        self._tracer = tracer

    def _start(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier)
        if method not in _ALWAYS and not trace.get_current_span(parent).get_span_context(
        ).is_valid:
            return None
        attrs: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": method,
        }
        name = f"{SERVICE}/{method}"
        if method in _ALWAYS:
            attrs.update(request_attributes(request))
            # Resolved once by the error interceptor, which runs first.
            resolved = request_context.current()
            model = resolved.model_label if resolved is not None else UNKNOWN
            name = f"{attrs['gen_ai.operation.name']} {model}"
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=attrs)
        # The call runs in a task of its own: the span stays current for the
        # rest of it (the error interceptor's log line included), with no
        # detach to get wrong across an async generator.
        otel_context.attach(trace.set_span_in_context(span, parent))
        _ATTEMPTS.set(_Attempts())
        return span

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._start(method, request, context)
            if span is None:
                return await behavior(request, context)
            try:
                reply = await behavior(request, context)
            except BaseException as exc:
                _fail(span, exc, context)
                raise
            if isinstance(reply, pb.GenerateResponse):
                span.set_attributes(response_attributes(reply))
            _end(span)
            return reply

        return unary

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span = self._start(method, request, context)
            if span is None:
                async for message in behavior(request, context):
                    yield message
                return
            start = time.monotonic()
            first = True
            last = None
            try:
                async for message in behavior(request, context):
                    if first and message.text:
                        first = False
                        span.add_event("first_token", {
                            "gen_ai.server.time_to_first_token": time.monotonic() - start,
                        })
                    last = message
                    yield message
            except BaseException as exc:
                _fail(span, exc, context)
                raise
            if last is not None:
                if last.finish_reason == pb.FINISH_REASON_ERROR:
                    # An error after the stream started travels in-band.
                    span.set_attribute("gen_ai.usage.output_tokens", last.tokens)
                    code = last.error.code if last.error.code in grpc.StatusCode.__members__ else (
                        "INTERNAL")
                    _set_error(span, code, last.error.reason or "INTERNAL", last.error.message)
                else:
                    span.set_attributes(response_attributes(last))
            _end(span)

        return stream


def _end(span: Any) -> None:
    attempts = _ATTEMPTS.get()
    if attempts is not None and attempts.count:
        span.set_attribute("llmmesh.replica", attempts.replica)
        span.set_attribute("llmmesh.retries", attempts.count - 1)
    span.end()


def _fail(span: Any, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, MeshError):
        _set_error(span, exc.code, exc.reason.value, exc.message)
    elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
            _set_error(span, "DEADLINE_EXCEEDED", Reason.TIMEOUT.value, "the deadline passed")
        else:
            _set_error(span, "CANCELLED", Reason.CANCELLED.value, "the client went away")
    elif isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        _set_error(span, name, name, str(context.details() or ""))
    else:
        span.record_exception(exc)
        _set_error(span, "INTERNAL", Reason.INTERNAL.value, "internal error")
    _end(span)


# -- client ------------------------------------------------------------------------------


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _ClientTracing:
    def __init__(self, tracer: Any, address: str) -> None:
        self._tracer = tracer
        self._address = address
        host, _, port = address.rpartition(":")
        self._attrs: dict[str, Any] = {
            "rpc.system": "grpc",
            "server.address": host.strip("[]") or address,
            "llmmesh.replica": address,
        }
        if port.isdigit():
            self._attrs["server.port"] = int(port)

    def start(
        self, details: grpc.aio.ClientCallDetails, request: Any
    ) -> tuple[Any, grpc.aio.ClientCallDetails]:
        path = _method_name(details)
        if not trace.get_current_span().get_span_context().is_valid:
            return None, details  # background calls (health checks) stay untraced
        service, _, method = path.lstrip("/").rpartition("/")
        attrs = {**self._attrs, "rpc.service": service, "rpc.method": method}
        attempts = _ATTEMPTS.get()
        if attempts is not None and path.startswith(_PREFIX):
            attempts.count += 1
            attempts.replica = self._address
            attrs["llmmesh.attempt"] = attempts.count
        if method in _ALWAYS:
            attrs.update(request_attributes(request))
        span = self._tracer.start_span(f"{service}/{method}", kind=SpanKind.CLIENT,
                                       attributes=attrs)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        return span, details._replace(metadata=metadata)

    def watch(self, span: Any, call: Any) -> None:
        def done(finished: Any) -> None:
            ended = time.time_ns()
            task = asyncio.ensure_future(_finish_client(span, finished, ended))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

        call.add_done_callback(done)


# Tasks that end client spans, held until done (the loop keeps weak references).
_PENDING: set[asyncio.Future[None]] = set()


async def _finish_client(span: Any, call: Any, ended: int) -> None:
    try:
        code = await call.code()
        details = await call.details()
    except Exception:  # a call torn down with its channel
        code, details = grpc.StatusCode.CANCELLED, ""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:512]))
    span.end(end_time=ended)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, tracing: _ClientTracing) -> None:
        self._tracing = tracing

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = self._tracing.start(client_call_details, request)
        call = await continuation(details, request)
        if span is not None:
            self._tracing.watch(span, call)
        return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, tracing: _ClientTracing) -> None:
        self._tracing = tracing

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = self._tracing.start(client_call_details, request)
        call = await continuation(details, request)
        if span is not None:
            self._tracing.watch(span, call)
        return call


def client_interceptors(tracer: Any, address: str) -> list[grpc.aio.ClientInterceptor]:
    tracing = _ClientTracing(tracer, address)
    return [_UnaryUnary(tracing), _UnaryStream(tracing)]
