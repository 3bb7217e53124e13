"""The mesh over gRPC, as real processes in front of TGI doubles: grpcurl,
one test per row of the error table, health, cancellation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.mesh import Mesh
from tests.harness.procs import free_port, python_module, start, stop
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def stub(address: str) -> pb_grpc.GenerateServiceStub:
    return pb_grpc.GenerateServiceStub(grpc.insecure_channel(address))


def reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def fail(address: str, request: pb.GenerateRequest, timeout: float = 10) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub(address).Generate(request, timeout=timeout)
    return caught.value


# -- grpcurl ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["router", "envoy"])
def test_grpcurl_lists_and_calls(mesh: Mesh, where: str) -> None:
    address = getattr(mesh, where)
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"llmmesh.v1.GenerateService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    called = grpcurl("-d", '{"model_id": "qwen2", "inputs": "你好", '
                     '"parameters": {"max_new_tokens": 64}}',
                     address, "llmmesh.v1.GenerateService/Generate")
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["generated_text"] == "你好"
    assert reply["model"] == "Qwen2-7B-Instruct-GPTQ-Int4" and reply["tokens"] == 2
    health = grpcurl(address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr


def test_grpcurl_describes_and_streams(mesh: Mesh) -> None:
    described = grpcurl(mesh.router, "describe", "llmmesh.v1.GenerateService")
    assert "rpc GenerateStream" in described.stdout
    streamed = grpcurl("-d", '{"model_id": "llama3", "inputs": "one two three"}',
                       mesh.router, "llmmesh.v1.GenerateService/GenerateStream")
    assert streamed.returncode == 0, streamed.stderr
    messages = [json.loads(m) for m in streamed.stdout.replace("}\n{", "}\x00{").split("\x00")]
    # Tokens that arrive together travel in one message.
    assert "".join(m.get("text", "") for m in messages[:-1]) == "one two three"
    assert messages[-1]["finish_reason"] == "FINISH_REASON_EOS_TOKEN"
    assert messages[-1]["tokens"] == 4  # three words and the end-of-sequence token


def test_per_model_health(mesh: Mesh) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(mesh.router))
    for name in ("", "llmmesh.v1.GenerateService", "qwen2", "llama3"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


# -- the error table, one row each -------------------------------------------------


def test_tgi_validation_422_is_invalid_argument(clean: Mesh) -> None:
    # Passes the mesh's checks, but is longer than the backend's token limit.
    long = " ".join(["word"] * 4500)
    error = fail(clean.router, pb.GenerateRequest(model_id="qwen2", inputs=long))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "INVALID_ARGUMENT"
    assert "Input validation error" in error.details()


def test_tgi_overloaded_429_is_resource_exhausted(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="overloaded")
    error = fail(clean.router, pb.GenerateRequest(model_id="qwen2", inputs="hi"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == "OVERLOADED"


def test_tgi_generation_424_is_internal_model_error(clean: Mesh) -> None:
    clean.doubles["llama3"].control(mode="generation_error")
    error = fail(clean.router, pb.GenerateRequest(model_id="llama3", inputs="hi"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert reason(error) == "MODEL_ERROR"


def test_incomplete_stream_is_an_in_band_error(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="incomplete", after_tokens=2)
    replies = list(stub(clean.router).GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs="a b c d e"), timeout=10))
    assert "".join(r.text for r in replies[:-1]) == "a b"
    assert replies[-1].finish_reason == pb.FINISH_REASON_ERROR
    assert (replies[-1].error.code, replies[-1].error.reason) == (
        "UNAVAILABLE", "INCOMPLETE_GENERATION")


def test_incomplete_unary_is_unavailable(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="incomplete")
    error = fail(clean.router, pb.GenerateRequest(model_id="qwen2", inputs="a b c"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(error) == "INCOMPLETE_GENERATION"


def test_hung_backend_is_deadline_exceeded_and_cancelled(clean: Mesh) -> None:
    double = clean.doubles["qwen2"]
    double.control(mode="hang")
    started = time.monotonic()
    error = fail(clean.router, pb.GenerateRequest(model_id="qwen2", inputs="hi"), timeout=1.0)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    eventually(lambda: double.stats()["generations_cancelled"] == 1)


def test_dropped_connection_midstream_is_reported(clean: Mesh) -> None:
    clean.doubles["llama3"].control(mode="die_midstream", after_tokens=1)
    replies = list(stub(clean.router).GenerateStream(
        pb.GenerateStreamRequest(model_id="llama3", inputs="a b c"), timeout=10))
    assert replies[-1].finish_reason == pb.FINISH_REASON_ERROR
    assert replies[-1].error.reason == "INCOMPLETE_GENERATION"


def test_refused_connection_is_unavailable(tmp_path: Path) -> None:
    # An adapter whose TGI is not there at all.
    port = free_port()
    adapter = start(python_module(
        "services.adapter", "--model", "qwen2", "--port", str(port),
        "--tgi-url", f"http://127.0.0.1:{free_port()}"), log_path=tmp_path / "adapter.log")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        error = fail(f"127.0.0.1:{port}", pb.GenerateRequest(model_id="qwen2", inputs="hi"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(error) == "BACKEND_UNAVAILABLE"
    finally:
        stop(adapter)


# -- health and cancellation ----------------------------------------------------------


def test_health_follows_tgi_without_restart(clean: Mesh) -> None:
    double = clean.doubles["llama3"]
    adapter = health_pb2_grpc.HealthStub(grpc.insecure_channel(clean.adapters["llama3"]))
    router = health_pb2_grpc.HealthStub(grpc.insecure_channel(clean.router))
    serving = health_pb2.HealthCheckResponse.SERVING

    def status(h: health_pb2_grpc.HealthStub, service: str = "") -> int:
        return int(h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    double.control(mode="unhealthy")
    eventually(lambda: status(adapter) != serving)
    eventually(lambda: status(router, "llama3") != serving)
    assert status(router) == serving  # qwen2 still serves
    error = fail(clean.router, pb.GenerateRequest(model_id="llama3", inputs="hi"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    double.control(mode="ok")
    eventually(lambda: status(adapter) == serving)
    eventually(lambda: status(router, "llama3") == serving)


def test_cancelled_stream_closes_the_tgi_connection(clean: Mesh) -> None:
    double = clean.doubles["qwen2"]
    double.control(token_delay=0.2)
    call = stub(clean.router).GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs=" ".join(["w"] * 50)), timeout=30)
    assert next(call).text == "w"
    call.cancel()
    eventually(lambda: double.stats()["generations_cancelled"] == 1)
    stats = double.stats()
    assert stats["generations_completed"] == 0 and stats["generations_active"] == 0


def test_invalid_request_never_reaches_tgi(clean: Mesh) -> None:
    def generations() -> dict[str, int]:
        # Health and load probes (GET /health, /metrics) keep arriving meanwhile.
        requests = clean.doubles["qwen2"].stats()["requests"]
        return {k: v for k, v in requests.items() if k.startswith("POST")}

    before = generations()
    error = fail(clean.router, pb.GenerateRequest(
        model_id="qwen2", inputs="hi", parameters=pb.GenerationParameters(top_p=1.0)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert generations() == before
