"""The GenerateService servicer: one thin translation between protobuf and a
transport-free core. The router and the adapters differ only in the core
they pass in; errors, metrics and logs are the interceptor's
(services.common.rpc_interceptor)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from services.common import pb_convert, request_context
from services.common.errors import MeshError, Reason
from services.common.request_context import RequestContext
from services.common.types import Chunk, Generation, GenerationRequest, ModelInfo, ResumePolicy
from services.common.validation import RESUME_HEADER, resume_policy

log = logging.getLogger("llmmesh.rpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerateService"].full_name
# gRPC cancels a handler both when the client goes away and when the deadline
# passes; with less than this left, it was the deadline (Envoy resets a
# stream a few ms before the deadline itself).
DEADLINE_SLACK_SECONDS = 0.05


class GenerationCore(Protocol):
    """What a servicer needs from a core; nothing here knows about gRPC."""

    async def generate(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> Generation: ...

    def generate_stream(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> AsyncIterator[Chunk | Generation]: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def count_tokens(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> tuple[int, bool]:
        """The input tokens `request` gives its model, and whether they were
        counted by a tokenizer (else a stated upper bound)."""
        ...

    async def get_model(self, model_id: str) -> ModelInfo: ...

    def resolve(self, model_id: str, scenario: str) -> RequestContext:
        """The request's model and bounded labels, looked up once (never raises:
        an unknown model is the core's error to raise when it serves the call)."""
        ...


class GenerateServicer(pb_grpc.GenerateServiceServicer):
    """Translates between protobuf and the core; errors are the interceptor's."""

    def __init__(self, core: GenerationCore) -> None:
        self._core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        result = await self._core.generate(
            pb_convert.request_from_pb(request), context.time_remaining(),
            request_context.current(),
        )
        return pb_convert.generation_to_pb(result)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        tokens = 0
        started = False
        domain = pb_convert.request_from_pb(request)
        if domain.resume is ResumePolicy.DEFAULT:
            header = next(
                (v for k, v in context.invocation_metadata() or ()
                 if k == RESUME_HEADER and isinstance(v, str)),
                None,
            )
            if header is not None:
                domain = domain.evolve(resume=resume_policy(header))
        events = self._core.generate_stream(
            domain, context.time_remaining(), request_context.current()
        )
        try:
            async for event in events:
                if isinstance(event, Chunk):
                    tokens = event.tokens
                    started = True
                    yield pb_convert.chunk_to_pb(event)
                else:
                    yield pb_convert.final_to_pb(event)
        except Exception as exc:
            if not started:
                raise  # Still before the first message: a real gRPC status.
            # HTTP clients behind Envoy cannot see a status after the 200, so
            # the error becomes the stream's last message.
            if not isinstance(exc, MeshError):
                log.error("unhandled error in a stream", exc_info=exc)
                exc = MeshError(Reason.INTERNAL, "internal error; see the service log")
            yield pb_convert.failure_to_pb(exc, tokens)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = await self._core.list_models()
        return pb.ListModelsResponse(models=[pb_convert.model_to_pb(m) for m in models])

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        count, exact = await self._core.count_tokens(
            pb_convert.request_from_pb(request.request), request_context.current())
        return pb.CountTokensResponse(input_tokens=count, exact=exact)

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageResponse:
        usage = getattr(self._core, "usage", None)
        if usage is None:  # an adapter: tenants are the router's
            raise MeshError(Reason.ADMIN_ONLY, "usage is served by the router only")
        report = await usage(request_context.current())
        return pb.GetUsageResponse(tenants=[
            pb.TenantUsage(
                tenant=u.tenant, in_flight=u.concurrent, concurrent_limit=u.concurrent_limit,
                windows=[
                    pb.UsageWindow(
                        name=w.name, limit=w.limit, used=w.used, remaining=w.remaining,
                        frees_in_seconds=round(w.frees_in, 3),
                        resets_in_seconds=round(w.resets_in, 3),
                    )
                    for w in u.windows
                ],
            )
            for u in report
        ])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        model = await self._core.get_model(request.model_id)
        return pb.GetModelResponse(model=pb_convert.model_to_pb(model))

