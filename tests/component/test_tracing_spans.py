"""Spans of real grpc.aio servers in one process (router and adapters over
in-process backends), recorded by the SDK's in-memory exporter: the attempts
of a failover, and an error in the middle of a stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from llmmesh.v1 import generate_pb2 as pb
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.common import tracing
from services.common.errors import MeshError, Reason
from tests.fakes.backend import FakeBackend


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory; requested before the servers start (the
    interceptors are installed when servers and channels are made)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


def ask() -> pb.GenerateRequest:
    return pb.GenerateRequest(model_id="qwen2", inputs="hi")


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_failover_is_two_attempts_under_one_request(
    spans: InMemorySpanExporter, start_adapter: Any, start_router: Any
) -> None:
    down = FakeBackend(fail=MeshError(Reason.BACKEND_UNAVAILABLE, "connection refused"))
    a = await start_adapter("qwen2", down)
    b = await start_adapter("qwen2")
    router = await start_router({"qwen2": [a.address, b.address]})
    for _ in range(2):  # the first pick alternates: one of the two lands on a
        await router.stub.Generate(ask(), timeout=5)
    # Attempt spans end from the calls' done callbacks: wait for all three.
    for _ in range(200):
        finished = spans.get_finished_spans()
        if sum("llmmesh.attempt" in attrs(s) for s in finished) >= 3:
            break
        await asyncio.sleep(0.01)
    servers = [s for s in finished if s.kind == SpanKind.SERVER and "llmmesh.retries" in attrs(s)]
    routed = [s for s in servers if attrs(s)["llmmesh.retries"] == 1]
    assert len(routed) == 1, [attrs(s) for s in servers]
    request = routed[0]
    assert attrs(request)["llmmesh.replica"] == b.address
    assert request.status.status_code == StatusCode.UNSET
    attempts = sorted(
        (s for s in finished if s.kind == SpanKind.CLIENT
         and s.parent is not None and s.parent.span_id == request.context.span_id),
        key=lambda s: attrs(s)["llmmesh.attempt"])
    assert [attrs(s)["llmmesh.replica"] for s in attempts] == [a.address, b.address]
    assert [attrs(s)["llmmesh.attempt"] for s in attempts] == [1, 2]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].status.description.startswith("UNAVAILABLE")
    assert attempts[1].status.status_code == StatusCode.UNSET
    # The failed attempt's own server span, at the adapter, names the reason.
    failed = [s for s in finished if s.kind == SpanKind.SERVER
              and s.parent is not None and s.parent.span_id == attempts[0].context.span_id]
    assert [attrs(s)["error.type"] for s in failed] == ["BACKEND_UNAVAILABLE"]


async def test_an_error_in_a_stream_is_recorded_after_its_tokens(
    spans: InMemorySpanExporter, start_adapter: Any, start_router: Any
) -> None:
    broken = FakeBackend(fail=MeshError(Reason.MODEL_ERROR, "CUDA out of memory"), fail_after=2)
    a = await start_adapter("qwen2", broken)
    router = await start_router({"qwen2": [a.address]})
    request = pb.GenerateStreamRequest(model_id="qwen2", inputs="hi")
    replies = [m async for m in router.stub.GenerateStream(request, timeout=5)]
    assert replies[-1].finish_reason == pb.FINISH_REASON_ERROR
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(servers) == 2  # router and adapter, one trace
    assert len({s.context.trace_id for s in servers}) == 1
    for span in servers:
        assert attrs(span)["error.type"] == "MODEL_ERROR"
        assert span.status.status_code == StatusCode.ERROR
        assert attrs(span)["gen_ai.usage.output_tokens"] == 2
        assert [e.name for e in span.events] == ["first_token"]
