"""Distributed tracing: OpenTelemetry, configured by the standard OTEL_* variables.

Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
is set, and off otherwise. Off, nothing of OpenTelemetry is imported and no
interceptor, middleware or hook is installed: a request costs exactly what it
did without tracing. On, spans go over OTLP through the SDK's batch processor,
so every standard variable applies: OTEL_EXPORTER_OTLP_PROTOCOL (`grpc` or
`http/protobuf`, the default), _HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE,
OTEL_BSP_* (batching), OTEL_TRACES_SAMPLER(_ARG), OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES. OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none
turn it off again.

W3C trace context (`traceparent`, `tracestate`) is read from incoming gRPC
metadata and HTTP headers and sent on every outgoing call, so one request is
one trace from Envoy through the router and an adapter to the engine. The
transport pieces live in `tracing_grpc` (interceptors) and `tracing_http`
(aiohttp client and server); they are imported only when tracing is on.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common import logs

if TYPE_CHECKING:
    import aiohttp
    import grpc

PROTOCOLS = ("grpc", "http/protobuf")

# What `--help` shows about tracing (the flags' epilogue).
HELP = (
    "tracing: OpenTelemetry over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set "
    "(OTEL_EXPORTER_OTLP_PROTOCOL grpc or http/protobuf, OTEL_SERVICE_NAME, OTEL_BSP_*, "
    "OTEL_TRACES_SAMPLER); off when it is not"
)


@dataclass(frozen=True)
class TracingSettings:
    """Whether and where to export spans, from the OTEL_* environment."""

    endpoint: str | None
    protocol: str
    service_name: str

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str], service: str) -> TracingSettings:
        endpoint = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        ) or None
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            endpoint = None
        if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
            endpoint = None
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"  # the specification's default
        ).strip()
        if endpoint is not None and protocol not in PROTOCOLS:
            raise SystemExit(
                f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(PROTOCOLS)}, "
                f"got {protocol!r}"
            )
        return cls(endpoint=endpoint, protocol=protocol, service_name=service)


# Seconds the exit waits for buffered spans: the exporter retries an
# unreachable collector for OTEL_EXPORTER_OTLP_TIMEOUT (10 s by default),
# which must not hold up a service's stop.
SHUTDOWN_GRACE_SECONDS = 2.0


class _State:
    """The process's tracer once `setup` turned tracing on; None while off."""

    tracer: Any = None
    provider: Any = None


_state = _State()


def enabled() -> bool:
    return _state.tracer is not None


def tracer() -> Any:
    """The process's OpenTelemetry tracer (only while tracing is on)."""
    assert _state.tracer is not None, "tracing is off"
    return _state.tracer


def setup(service: str, env: Mapping[str, str] | None = None) -> TracingSettings:
    """Turn tracing on for this process when the environment asks for it.

    Called once from a service's `__main__`; `service` is the default
    service.name (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win).
    """
    env = os.environ if env is None else env
    settings = TracingSettings.from_env(env, service)
    if not settings.enabled:
        return settings
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {"service.namespace": "llmmesh"}
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attributes["service.name"] = service
    resource = Resource.create(attributes)
    # Reads OTEL_TRACES_SAMPLER itself; its exit hook would wait for the
    # exporter's retries, so `shutdown` (bounded) is registered instead.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    # The exporters and the batch processor read OTEL_EXPORTER_OTLP_* and
    # OTEL_BSP_* themselves.
    exporter: Any
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        exporter = HttpSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install(provider)
    atexit.register(shutdown)
    return settings


def install(provider: Any) -> None:
    """Trace with `provider` (an SDK TracerProvider): what `setup` does once
    it has built one; tests pass their own, with an in-memory exporter."""
    _state.provider = provider
    _state.tracer = provider.get_tracer("llmmesh")
    logs.context_fields = log_fields


def shutdown(grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
    """Export what is still buffered and stop, waiting at most `grace`
    seconds (also done at interpreter exit): what a collector that cannot be
    reached has not taken by then is dropped, with one log line."""
    provider = _state.provider
    _state.provider = None
    _state.tracer = None
    logs.context_fields = None
    if provider is None:
        return
    worker = threading.Thread(target=provider.shutdown, name="trace-export-stop", daemon=True)
    worker.start()
    worker.join(grace)
    if worker.is_alive():
        logging.getLogger("llmmesh.tracing").warning(
            "trace export did not finish within %.1f s; the spans still buffered are dropped",
            grace,
        )


def log_fields() -> dict[str, str]:
    """trace_id and span_id of the current span, for every log line."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def event(name: str, attributes: Mapping[str, str | int]) -> None:
    """Add an event to the current span (nothing while tracing is off)."""
    if _state.tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, dict(attributes))


# -- hooks for the transports: empty while tracing is off ------------------------------


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A span per GenerateService call, named after the model the error
    interceptor resolved (services.common.request_context).

    Goes after the error interceptor, so that it sees the core's own errors.
    """
    if not enabled():
        return []
    from services.common import tracing_grpc

    return [tracing_grpc.ServerTracing(tracer())]


def client_interceptors(address: str) -> list[grpc.aio.ClientInterceptor]:
    """For a channel to `address`: a span per call, and its context sent along."""
    if not enabled():
        return []
    from services.common import tracing_grpc

    return tracing_grpc.client_interceptors(tracer(), address)


def http_client_tracing() -> list[aiohttp.TraceConfig]:
    """For an aiohttp session: a span per request, and `traceparent` sent along."""
    if not enabled():
        return []
    from services.common import tracing_http

    return [tracing_http.client_trace_config(tracer())]


def http_server_middlewares() -> list[Callable[..., Any]]:
    """For an aiohttp app: a span per request, joined to the caller's trace."""
    if not enabled():
        return []
    from services.common import tracing_http

    return [tracing_http.server_middleware(tracer())]


__all__ = [
    "HELP",
    "TracingSettings",
    "client_interceptors",
    "enabled",
    "http_client_tracing",
    "http_server_middlewares",
    "install",
    "log_fields",
    "server_interceptors",
    "setup",
    "shutdown",
]
