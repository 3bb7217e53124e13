"""The gRPC server bootstrap shared by the router and the adapters: the flags
every service takes, and a server with GenerateService, Health and
reflection behind the error and tracing interceptors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from llmmesh.v1 import generate_pb2_grpc as pb_grpc
from prometheus_client import start_http_server

from services.common import tls, tracing
from services.common.auth import ApiKeys
from services.common.health import HealthBoard
from services.common.metrics import Metrics
from services.common.registry import DEFAULT_REGISTRY
from services.common.rpc_interceptor import MeshInterceptor
from services.common.servicer import SERVICE_NAME, GenerateServicer, GenerationCore
from services.common.tls import TlsFiles

if TYPE_CHECKING:
    from services.tenancy.caller import Callers

# How many accepted calls may wait for the event loop to take them up.
PENDING_CALLS = 65_536


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
    callers: Callers | None = None,
) -> RunningServer:
    """Start GenerateService, Health and reflection on settings.host:port.

    With `api_keys`, every GenerateService call must carry one of them; with
    `callers` (tenants), the key names the call's tenant.
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
        # Calls gRPC has accepted but the event loop has not yet taken up.
        # Past gRPC's defaults (1,000, and 3,000 for certain) it drops them at
        # random with a bare CANCELLED before any handler runs; a burst of a
        # few thousand streams must instead reach the core, whose bound
        # refuses them plainly (OVERLOADED, RetryInfo).
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
    ]
    server = grpc.aio.server(
        interceptors=[
            MeshInterceptor(core, metrics, api_keys, callers),
            # Inside the error interceptor: sees the core's own errors.
            *tracing.server_interceptors(),
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

