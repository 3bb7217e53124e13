"""One adapter replica, as the router's core sees it: a client that speaks
domain types and raises MeshError.

It owns the replica's gRPC channel and stubs, converts requests and replies
at this edge, and turns every failure (a gRPC status, or an error delivered
in-band on a stream) into a MeshError, so the core never sees the transport.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from services.common import pb_convert, tracing
from services.common.errors import MeshError
from services.common.rich_status import from_rpc_error
from services.common.types import (
    Chunk,
    EngineLoad,
    Generation,
    GenerationRequest,
    Limits,
    ModelInfo,
)

# Marks the health round's GetModel as a poll: adapters log it at debug.
POLL = (("x-llmmesh-poll", "1"),)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),  # the router chooses where to retry
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(eq=False)
class Replica:
    """One adapter address over one long-lived channel, and what the router
    knows about it: whether it serves, its requests in flight, and the
    engine load its adapter last reported."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerateServiceStub
    health: health_pb2_grpc.HealthStub
    serving: bool = False
    in_flight: int = 0
    # The engine's load at the last report (None: it reports none), and the
    # router's own requests in flight there when the report arrived.
    load: EngineLoad | None = None
    in_flight_at_report: int = 0
    _serial: int = field(default_factory=itertools.count().__next__)

    @classmethod
    def connect(
        cls, address: str, credentials: grpc.ChannelCredentials | None = None
    ) -> Replica:
        traced = tracing.client_interceptors(address)  # none while tracing is off
        if credentials is None:
            channel = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS, interceptors=traced)
        else:
            channel = grpc.aio.secure_channel(
                address, credentials, options=CHANNEL_OPTIONS, interceptors=traced)
        return cls(
            address, channel, pb_grpc.GenerateServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )

    def report(self, load: EngineLoad | None) -> None:
        self.load = load
        self.in_flight_at_report = self.in_flight

    def track(self) -> _Tracked:
        """Counts a request in `in_flight` while entered."""
        return _Tracked(self)

    async def generate(self, request: GenerationRequest, timeout: float | None) -> Generation:
        message = pb_convert.request_to_pb(request, pb.GenerateRequest)
        try:
            reply = await self.stub.Generate(message, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return pb_convert.generation_from_pb(reply)

    async def count_tokens(
        self, request: GenerationRequest, timeout: float | None
    ) -> tuple[int, bool]:
        """The input tokens of `request` as this replica's engine counts them."""
        message = pb.CountTokensRequest(
            request=pb_convert.request_to_pb(request, pb.GenerateRequest))
        try:
            reply = await self.stub.CountTokens(message, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return reply.input_tokens, reply.exact

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None
    ) -> AsyncIterator[Chunk | Generation]:
        """The replica's stream as domain events; an in-band error is raised."""
        message = pb_convert.request_to_pb(request, pb.GenerateStreamRequest)
        call = self.stub.GenerateStream(message, timeout=timeout)
        try:
            async for reply in call:
                event = pb_convert.stream_event_from_pb(reply)
                if isinstance(event, MeshError):
                    raise event
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op when done; stops the adapter when the client left

    async def check(self, timeout: float) -> bool:
        """Whether the replica's grpc.health.v1 status is SERVING."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def model_info(self, model_id: str, static: Limits, timeout: float) -> ModelInfo:
        """The model as this replica describes it (its engine's limits included)."""
        try:
            reply = await self.stub.GetModel(
                pb.GetModelRequest(model_id=model_id), timeout=timeout, metadata=POLL
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return pb_convert.model_from_pb(reply.model, static)

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace=grace)


class _Tracked:
    __slots__ = ("replica",)

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __enter__(self) -> None:
        self.replica.in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self.replica.in_flight -= 1
