"""Router and adapters as real gRPC servers over in-process backends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from llmmesh.v1 import generate_pb2 as pb

from services.common.errors import MeshError, Reason
from tests.fakes.backend import FakeBackend
from tests.harness.procs import ROOT


def details(exc: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest fields of a rich status."""
    status = rpc_status.from_call(exc)
    assert status is not None, "the status carries no details"
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return info, fields


def ask(model="qwen2", inputs="你好", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model_id=model, inputs=inputs, parameters=pb.GenerationParameters(**params)
    )


async def mesh(start_adapter, start_router, **backends):
    adapters = {m: await start_adapter(m, b) for m, b in backends.items()}
    router = await start_router({m: [a.address] for m, a in adapters.items()})
    return router, adapters


async def test_guide_request_by_alias(start_adapter, start_router):
    router, adapters = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    reply = await router.stub.Generate(
        ask(max_new_tokens=64, temperature=0.7, top_p=0.9), timeout=5
    )
    assert reply.generated_text == "Hello there, friend."
    assert reply.model == "Qwen2-7B-Instruct-GPTQ-Int4"
    assert reply.model_id == "qwen2"
    assert (reply.tokens, reply.input_tokens) == (5, 7)
    assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    sent = adapters["qwen2"].backend.params[0]
    assert (sent.max_new_tokens, sent.temperature, sent.top_p) == (64, 0.7, 0.9)
    again = await router.stub.Generate(ask(model="QWEN"), timeout=5)
    assert again.model_id == "qwen2"


async def test_routes_by_model(start_adapter, start_router):
    router, adapters = await mesh(
        start_adapter, start_router, qwen2=FakeBackend(), llama3=FakeBackend(words=["Hi", "!"])
    )
    reply = await router.stub.Generate(ask(model="llama3", inputs="Hello, how are you?"), timeout=5)
    assert reply.model == "Llama-3.1-8B-Instruct-GPTQ-INT4" and reply.generated_text == "Hi!"
    prompt = adapters["llama3"].backend.prompts[0]
    assert "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?" in prompt
    assert adapters["qwen2"].backend.prompts == []


async def test_unknown_model_is_not_found_naming_known(start_adapter, start_router):
    router, _ = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Generate(ask(model="gpt-4"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "qwen2" in caught.value.details() and "llama3" in caught.value.details()
    info, _ = details(caught.value)
    assert info.reason == "MODEL_NOT_FOUND" and info.domain == "llmmesh.v1"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"max_new_tokens": 100_000}, "parameters.max_new_tokens"),
        ({"temperature": 0}, "parameters.temperature"),
        ({"top_p": 1.0}, "parameters.top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
    ],
)
async def test_invalid_never_reaches_backend(start_adapter, start_router, params, field):
    router, adapters = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Generate(ask(**params), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = details(caught.value)
    assert info.reason == "INVALID_ARGUMENT" and fields == [field]
    assert adapters["qwen2"].backend.prompts == []


async def test_empty_inputs_and_unknown_scenario(start_adapter, start_router):
    router, _ = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    for request, field in [
        (ask(inputs=""), "inputs"),
        (pb.GenerateRequest(model_id="qwen2", inputs="x", scenario="poem"), "scenario"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.stub.Generate(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(caught.value)[1] == [field]


SCENARIOS = yaml.safe_load(
    (ROOT / "services" / "router" / "scenarios.yaml").read_text(encoding="utf-8")
)["scenarios"]


@pytest.mark.parametrize("scenario", ["qa", "summarize", "rewrite"])
async def test_scenarios_reach_model_as_chat(start_adapter, start_router, scenario):
    router, adapters = await mesh(start_adapter, start_router, llama3=FakeBackend())
    question = "光合作用的原理是什么？"
    request = pb.GenerateRequest(model_id="llama3", inputs=question, scenario=scenario)
    await router.stub.Generate(request, timeout=5)
    prompt = adapters["llama3"].backend.prompts[0]
    # The scenario's own system message and user template, in Llama 3's turns.
    system = SCENARIOS[scenario]["system"].strip()
    user = SCENARIOS[scenario]["user"].replace("{inputs}", question).strip()
    assert prompt.count("<|start_header_id|>system") == 1
    assert f"\n\n{system}<|eot_id|>" in prompt
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>" in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


async def test_chat_scenario_sends_the_text_alone(start_adapter, start_router):
    router, adapters = await mesh(start_adapter, start_router, llama3=FakeBackend())
    await router.stub.Generate(ask(model="llama3", inputs="Hello"), timeout=5)
    prompt = adapters["llama3"].backend.prompts[0]
    assert "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>" in prompt
    for other in ("qa", "summarize", "rewrite"):
        assert SCENARIOS[other]["system"].strip() not in prompt


async def test_stream_messages_then_final(start_adapter, start_router):
    router, _ = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    request = pb.GenerateStreamRequest(model_id="qwen2", inputs="hi")
    replies = [m async for m in router.stub.GenerateStream(request, timeout=5)]
    assert [m.text for m in replies[:-1]] == ["Hello", " there", ",", " friend", "."]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in replies[:-1])
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert (last.generated_text, last.tokens, last.input_tokens) == ("Hello there, friend.", 5, 7)
    assert last.model == "Qwen2-7B-Instruct-GPTQ-Int4"


async def test_error_before_first_token_is_a_status(start_adapter, start_router):
    backend = FakeBackend(fail=MeshError(Reason.OVERLOADED, "Model is overloaded"), fail_after=0)
    router, _ = await mesh(start_adapter, start_router, qwen2=backend)
    request = pb.GenerateStreamRequest(model_id="qwen2", inputs="hi")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [m async for m in router.stub.GenerateStream(request, timeout=5)]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)[0].reason == "OVERLOADED"


async def test_error_after_first_token_is_in_band(start_adapter, start_router):
    backend = FakeBackend(fail=MeshError(Reason.MODEL_ERROR, "CUDA out of memory"), fail_after=2)
    router, _ = await mesh(start_adapter, start_router, qwen2=backend)
    request = pb.GenerateStreamRequest(model_id="qwen2", inputs="hi")
    replies = [m async for m in router.stub.GenerateStream(request, timeout=5)]
    assert [m.text for m in replies[:-1]] == ["Hello", " there"]
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_ERROR
    assert (last.error.code, last.error.reason) == ("INTERNAL", "MODEL_ERROR")
    assert "CUDA out of memory" in last.error.message


async def test_balances_across_replicas(start_adapter, start_router):
    a = await start_adapter("qwen2")
    b = await start_adapter("qwen2")
    router = await start_router({"qwen2": [a.address, b.address]})
    for _ in range(6):
        await router.stub.Generate(ask(), timeout=5)
    assert len(a.backend.prompts) == 3 and len(b.backend.prompts) == 3


async def test_fails_over_when_a_replica_dies(start_adapter, start_router):
    a = await start_adapter("qwen2")
    b = await start_adapter("qwen2")
    router = await start_router({"qwen2": [a.address, b.address]})
    await a.server.server.stop(0)  # killed without a word: the router still thinks it serves
    for _ in range(4):
        reply = await router.stub.Generate(ask(), timeout=5)
        assert reply.generated_text
    assert len(b.backend.prompts) == 4
    models = await router.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    qwen = next(m for m in models.models if m.id == "qwen2")
    assert (qwen.replicas, qwen.ready_replicas, qwen.ready) == (2, 1, True)


async def test_fails_over_when_a_replica_backend_is_down(start_adapter, start_router):
    down = FakeBackend(fail=MeshError(Reason.BACKEND_UNAVAILABLE, "connection refused"))
    a = await start_adapter("qwen2", down)
    b = await start_adapter("qwen2")
    router = await start_router({"qwen2": [a.address, b.address]})
    for _ in range(3):
        await router.stub.Generate(ask(), timeout=5)
    assert len(down.prompts) <= 1 and len(b.backend.prompts) == 3


async def test_no_serving_replica_is_unavailable(start_adapter, start_router):
    down = FakeBackend(fail=MeshError(Reason.BACKEND_UNAVAILABLE, "connection refused"))
    router, _ = await mesh(start_adapter, start_router, qwen2=down)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.stub.Generate(ask(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Generate(ask(model="llama3"), timeout=5)  # no adapter at all
    assert details(caught.value)[0].reason == "MODEL_UNAVAILABLE"


async def test_deadline_propagates(start_adapter, start_router):
    router, _ = await mesh(start_adapter, start_router, qwen2=FakeBackend(delay=3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Generate(ask(), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 2


async def test_cancelled_stream_cancels_backend(start_adapter, start_router):
    router, adapters = await mesh(start_adapter, start_router, qwen2=FakeBackend(delay=0.2))
    call = router.stub.GenerateStream(pb.GenerateStreamRequest(model_id="qwen2", inputs="hi"))
    first = await call.read()
    assert first.text == "Hello"
    call.cancel()
    for _ in range(50):
        if adapters["qwen2"].backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert adapters["qwen2"].backend.cancelled == 1


async def test_list_and_get_models(start_adapter, start_router):
    router, _ = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    reply = await router.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    by_id = {m.id: m for m in reply.models}
    assert list(by_id) == ["qwen2", "llama3"]
    assert by_id["qwen2"].ready and not by_id["llama3"].ready
    assert by_id["qwen2"].backend_model == "fake/model"
    assert by_id["qwen2"].max_total_tokens == 2048
    assert by_id["qwen2"].max_new_tokens == 2047  # narrowed by the backend's limit
    one = await router.stub.GetModel(pb.GetModelRequest(model_id="qwen"), timeout=5)
    assert one.model.id == "qwen2" and "qwen" in one.model.aliases
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.GetModel(pb.GetModelRequest(model_id="nope"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_adapter_health_follows_backend(start_adapter):
    adapter = await start_adapter("qwen2")
    channel = grpc.aio.insecure_channel(adapter.address)
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    assert (await health.Check(check())).status == health_pb2.HealthCheckResponse.SERVING
    adapter.backend.healthy = False
    await adapter.refresh()
    assert (await health.Check(check())).status == health_pb2.HealthCheckResponse.NOT_SERVING
    adapter.backend.healthy = True
    await adapter.refresh()
    reply = await health.Check(check(service="qwen2"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await channel.close()


async def test_metrics_count_requests_and_tokens(start_adapter, start_router):
    router, adapters = await mesh(start_adapter, start_router, qwen2=FakeBackend())
    for _ in range(3):
        await router.stub.Generate(ask(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await router.stub.Generate(ask(model="nope"), timeout=5)
    value = router.metrics.registry.get_sample_value
    assert value("llmmesh_requests_total", {
        "service": "router", "model": "qwen2", "scenario": "chat", "method": "Generate",
        "code": "OK"}) == 3
    assert value("llmmesh_errors_total", {
        "service": "router", "model": "unknown", "reason": "model_not_found"}) == 1
    assert value("llmmesh_output_tokens_total", {"service": "router", "model": "qwen2"}) == 15
    assert value("llmmesh_input_tokens_total", {"service": "router", "model": "qwen2"}) == 21
    adapter_value = adapters["qwen2"].metrics.registry.get_sample_value
    assert adapter_value("llmmesh_output_tokens_total",
                         {"service": "adapter-qwen2", "model": "qwen2"}) == 15


async def test_last_replica_error_is_kept(start_adapter, start_router):
    broken = FakeBackend(
        fail=MeshError(Reason.INCOMPLETE_GENERATION, "stream ended early"), fail_after=0
    )
    router, _ = await mesh(start_adapter, start_router, qwen2=broken)
    for _ in range(2):  # and the replica stays in rotation: its backend is up
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.stub.Generate(ask(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(caught.value)[0].reason == "INCOMPLETE_GENERATION"


async def test_router_bounds_requests_in_flight(start_adapter, start_router):
    adapter = await start_adapter("qwen2", FakeBackend(delay=0.3))
    router = await start_router({"qwen2": [adapter.address]}, max_in_flight=2)
    held = [asyncio.ensure_future(router.stub.Generate(ask(), timeout=5)) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.stub.Generate(ask(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(caught.value)[0].reason == "OVERLOADED"
    stream = router.stub.GenerateStream(pb.GenerateStreamRequest(model_id="qwen2", inputs="x"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for reply in await asyncio.gather(*held):
        assert reply.generated_text
    assert len(adapter.backend.prompts) == 2  # the refused ones never reached it
    assert (await router.stub.Generate(ask(), timeout=5)).generated_text  # room again


async def test_a_bug_midstream_is_an_in_band_internal_error(start_adapter, start_router):
    class Broken(FakeBackend):
        async def generate_stream(self, prompt, params, timeout):
            async for event in super().generate_stream(prompt, params, timeout):
                yield event
                raise RuntimeError("a bug with a secret in it")

    router, _ = await mesh(start_adapter, start_router, qwen2=Broken())
    replies = [m async for m in router.stub.GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs="hi"), timeout=5)]
    assert replies[0].text == "Hello"
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_ERROR
    assert (last.error.code, last.error.reason) == ("INTERNAL", "INTERNAL")
    assert "secret" not in last.error.message  # the trace stays in the log
