"""The grpc.health.v1 service: the statuses a service reports, by service name."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio


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

