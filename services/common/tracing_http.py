"""HTTP tracing over aiohttp: the adapter's calls to its engine, and the CPU
backend's (TGI-compatible) server. Imported only while tracing is on.

Client: a CLIENT span per request made under a current span (the calls a
generation makes; health polls stay untraced), with `traceparent` sent along,
as TGI and OpenAI-compatible servers read it. The span covers the request up
to the response's headers, which is what aiohttp's tracing hooks show; the
adapter's server span covers the whole generation.

Server: a SERVER span per request, parented by the caller's `traceparent`;
it ends when the handler returns, after a streamed body has been written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def client_trace_config(tracer: Any) -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()

    async def on_start(
        session: aiohttp.ClientSession, ctx: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        ctx.span = None
        if not trace.get_current_span().get_span_context().is_valid:
            return
        url = params.url
        attrs: dict[str, Any] = {
            "http.request.method": params.method,
            "url.full": str(url.with_query(None)),
            "server.address": url.host or "",
        }
        if url.port is not None:
            attrs["server.port"] = url.port
        span = tracer.start_span(params.method, kind=SpanKind.CLIENT, attributes=attrs)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        for key, value in carrier.items():
            params.headers[key] = value
        ctx.span = span

    async def on_end(
        session: aiohttp.ClientSession, ctx: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        span = getattr(ctx, "span", None)
        if span is None:
            return
        status = params.response.status
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span.end()

    async def on_exception(
        session: aiohttp.ClientSession, ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        span = getattr(ctx, "span", None)
        if span is None:
            return
        span.set_attribute("error.type", type(params.exception).__name__)
        span.set_status(Status(StatusCode.ERROR, str(params.exception)[:512]))
        span.end()

    config.on_request_start.append(on_start)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_exception)
    return config


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Only these are traced: generations, not health checks, metrics or /info.
_TRACED = ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions")


def server_middleware(tracer: Any) -> Callable[..., Any]:
    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path not in _TRACED:
            return await handler(request)
        parent = _PROPAGATOR.extract(dict(request.headers))
        span = tracer.start_span(
            f"POST {request.path}", context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": request.path,
                        "url.path": request.path},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            span.set_attribute("http.response.status_code", exc.status)
            if exc.status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {exc.status}"))
            raise
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:512]))
            raise
        else:
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status}"))
            return response
        finally:
            span.end()
            otel_context.detach(token)

    return traced
