"""The GenerateService transport: one thin servicer over a transport-free core,
one interceptor for errors, metrics and logs, and the server bootstrap with
health, reflection and graceful shutdown. The router and the adapters differ
only in the core they pass in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc
from prometheus_client import start_http_server

from services.common import convert, tls, tracing
from services.common.auth import ApiKeys
from services.common.calls import CallRecord
from services.common.errors import MeshError, Reason
from services.common.metrics import Metrics
from services.common.registry import DEFAULT_REGISTRY
from services.common.rpc import to_status
from services.common.tls import TlsFiles
from services.common.types import Chunk, Generation, GenerationRequest, ModelInfo

log = logging.getLogger("llmmesh.rpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerateService"].full_name
DEADLINE_SLACK_SECONDS = 0.05


class GenerationCore(Protocol):
    """What a servicer needs from a core; nothing here knows about gRPC."""

    async def generate(self, request: GenerationRequest, timeout: float | None) -> Generation: ...

    def generate_stream(
        self, request: GenerationRequest, timeout: float | None
    ) -> AsyncIterator[Chunk | Generation]: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def get_model(self, model_id: str) -> ModelInfo: ...

    def labels(self, model_id: str, scenario: str) -> tuple[str, str]:
        """Bounded metric labels (model, scenario) for a request's values."""
        ...


class GenerateServicer(pb_grpc.GenerateServiceServicer):
    """Translates between protobuf and the core; errors are the interceptor's."""

    def __init__(self, core: GenerationCore) -> None:
        self._core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        result = await self._core.generate(
            convert.request_from_pb(request), context.time_remaining()
        )
        return convert.generation_to_pb(result)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        tokens = 0
        started = False
        events = self._core.generate_stream(
            convert.request_from_pb(request), context.time_remaining()
        )
        try:
            async for event in events:
                if isinstance(event, Chunk):
                    tokens = event.tokens
                    started = True
                    yield convert.chunk_to_pb(event)
                else:
                    yield convert.final_to_pb(event)
        except Exception as exc:
            if not started:
                raise  # Still before the first message: a real gRPC status.
            # HTTP clients behind Envoy cannot see a status after the 200, so
            # the error becomes the stream's last message.
            if not isinstance(exc, MeshError):
                log.error("unhandled error in a stream", exc_info=exc)
                exc = MeshError(Reason.INTERNAL, "internal error; see the service log")
            yield convert.failure_to_pb(exc, tokens)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = await self._core.list_models()
        return pb.ListModelsResponse(models=[convert.model_to_pb(m) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        model = await self._core.get_model(request.model_id)
        return pb.GetModelResponse(model=convert.model_to_pb(model))


class MeshInterceptor(grpc.aio.ServerInterceptor):
    """Maps MeshError through the error table, records metrics, logs each RPC.

    Unexpected exceptions become INTERNAL with a generic message: the stack
    trace goes to the log, never to the client.
    """

    def __init__(
        self, core: GenerationCore, metrics: Metrics, api_keys: ApiKeys | None = None
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._api_keys = api_keys
        # Wrapped handlers by method path: a method's handler never changes,
        # so it is wrapped once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self._api_keys is not None:
            self._api_keys.check(context.invocation_metadata())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path: str = details.method
        cached = self._wrapped.get(path)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or not path.startswith(f"/{SERVICE_NAME}/"):
            return handler
        self._wrapped[path] = self._wrap(path.rsplit("/", 1)[-1], handler)
        return self._wrapped[path]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Rpc(self, method, request, context)
            try:
                self._authenticate(context)
                response = await behavior(request, context)
            except BaseException as exc:
                await rpc.fail(exc)
                raise
            else:
                rpc.finish("OK", tokens=getattr(response, "tokens", None))
                return response

        return unary

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Rpc(self, method, request, context)
            last = None
            try:
                self._authenticate(context)
                async for message in behavior(request, context):
                    if last is None and message.text:
                        rpc.first_token()
                    last = message
                    yield message
            except GeneratorExit:
                # gRPC closed the stream while it waited at a yield: the peer
                # went away, often right after the last message. The call is
                # over: nothing can be sent, nothing may be awaited, and its
                # context must not be touched (that crashed with SIGSEGV).
                if last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    self._finish_stream(rpc, last)
                else:
                    rpc.finish("CANCELLED", reason=Reason.CANCELLED)
                raise
            except BaseException as exc:
                await rpc.fail(exc)
                raise
            self._finish_stream(rpc, last)

        return stream

    @staticmethod
    def _finish_stream(rpc: _Rpc, last: Any) -> None:
        """Account a stream by its last message: an in-band error, or OK."""
        if last is not None and last.finish_reason == pb.FINISH_REASON_ERROR:
            reason = Reason(last.error.reason) if last.error.reason in Reason.__members__ else (
                Reason.INTERNAL
            )
            rpc.finish(last.error.code, reason=reason, tokens=last.tokens)
        else:
            rpc.finish("OK", tokens=last.tokens if last is not None else None)


class _Rpc(CallRecord):
    """The books of one RPC (services.common.calls), and its failure as a status."""

    def __init__(
        self,
        owner: MeshInterceptor,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        model, scenario = owner._core.labels(
            getattr(request, "model_id", ""), getattr(request, "scenario", "")
        )
        # Read now: once gRPC has closed the call, its context must not be used.
        peer = context.peer()
        super().__init__(owner._metrics, method, model, scenario, peer=lambda: peer)
        self._context = context

    async def fail(self, exc: BaseException) -> None:
        if isinstance(exc, MeshError):
            self.finish(exc.code, reason=exc.reason, message=exc.message)
            await self._context.abort_with_status(to_status(exc))
        elif isinstance(exc, asyncio.CancelledError):
            # gRPC cancels the handler both when the client goes away and when
            # the deadline passes; the time left tells them apart. Envoy resets
            # a stream a few ms before the deadline itself, hence the slack.
            remaining = self._context.time_remaining()
            if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
                self.finish("DEADLINE_EXCEEDED", reason=Reason.TIMEOUT)
            else:
                self.finish("CANCELLED", reason=Reason.CANCELLED)
        elif isinstance(exc, grpc.aio.AbortError):
            self.finish(self._context.code().name if self._context.code() else "UNKNOWN")
        else:
            log.error(
                "unhandled error", exc_info=exc, extra={"method": self._method}
            )
            error = MeshError(Reason.INTERNAL, "internal error; see the service log")
            self.finish(error.code, reason=error.reason, message=str(exc))
            await self._context.abort_with_status(to_status(error))


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    grace_seconds: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    tls: TlsFiles | None = None


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """The flags every gRPC service of the mesh takes: where to listen, the
    registry, deadlines, shutdown, logs and TLS. Each also reads its LLMMESH_*
    environment variable (for containers) once the program calls
    `envflags.apply` after declaring its own flags."""
    p = parser
    p.add_argument("--registry", default=str(DEFAULT_REGISTRY), help="the model registry (YAML)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (default: none)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take when the client sets no deadline")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds open streams get to finish on SIGTERM")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    tls.add_arguments(p)
    p.epilog = tracing.HELP


def server_settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        grace_seconds=args.grace, tls=tls.from_arguments(args),
    )


class HealthBoard:
    """The grpc.health.v1 servicer and the statuses the service reports."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def set(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set(service, status)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthBoard
    metrics_server: Any = None

    async def stop(self, grace: float) -> None:
        # Probes and load balancers see NOT_SERVING before anything closes.
        await self.health.servicer.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


async def start_server(
    core: GenerationCore,
    metrics: Metrics,
    health: HealthBoard,
    settings: ServerSettings,
    api_keys: ApiKeys | None = None,
) -> RunningServer:
    """Start GenerateService, Health and reflection on settings.host:port.

    With `api_keys`, every GenerateService call must carry one of them.
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Above Envoy's own 60 KiB header limit, so its 431 is what long URLs get.
        ("grpc.max_metadata_size", 64 * 1024),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    server = grpc.aio.server(
        interceptors=[
            MeshInterceptor(core, metrics, api_keys),
            # Inside the error interceptor: sees the core's own errors.
            *tracing.server_interceptors(core.labels),
        ],
        options=options,
    )
    pb_grpc.add_GenerateServiceServicer_to_server(GenerateServicer(core), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls is not None:
        port = server.add_secure_port(address, settings.tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: address in use?")
    await server.start()
    metrics_server = None
    if settings.metrics_port is not None:
        try:
            metrics_server, _ = start_http_server(
                settings.metrics_port, addr=settings.host, registry=metrics.registry
            )
        except OSError as exc:
            await server.stop(0)
            raise SystemExit(
                f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {exc}"
            ) from exc
    return RunningServer(server, port, health, metrics_server)


async def serve_until_signalled(
    running: RunningServer,
    grace: float,
    watch: Coroutine[Any, Any, None],
    on_stop: Callable[[], Awaitable[None]],
) -> None:
    """Serve, with `watch` (the health loop) running, until SIGTERM or SIGINT;
    then shut down gracefully: health first, open streams within `grace`,
    the health loop, and last `on_stop` (close clients)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch)
    log.info("serving", extra={"port": running.port})
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": grace})
    await running.stop(grace)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await on_stop()
    log.info("stopped")
