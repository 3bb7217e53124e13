"""Distributed tracing through the real processes: Envoy, the router, an
adapter and a TGI double, each exporting its spans over OTLP to a receiver
started here (scripts/otlp_receiver.py, opentelemetry-proto's
collector.trace.v1 service and OTLP/HTTP). The router and the double export
over gRPC, the adapter and Envoy over http/protobuf, so both protocols run.

A request is one trace, parented Envoy -> router -> adapter -> engine, with
the GenAI attributes of the request and of its reply.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmmesh.v1 import generate_pb2 as pb

from scripts.otlp_receiver import OtlpReceiver
from tests.harness.fixtures import Traced, otel_env
from tests.harness.mesh import running_mesh
from tests.harness.parts import (
    AdapterPart,
    Part,
    RouterPart,
    http_json,
    sse_events,
    start_all,
    stop_all,
    stub,
)
from tests.harness.procs import free_port, python_module, wait_http
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration

REPLY = "alpha beta gamma delta epsilon zeta eta theta iota kappa"


def by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["span_id"]: s for s in spans}


def chain(spans: list[dict[str, Any]], leaf: dict[str, Any]) -> list[dict[str, Any]]:
    """`leaf` and its ancestors, leaf first, as far as the trace holds them."""
    ids = by_id(spans)
    out = [leaf]
    while out[-1]["parent_span_id"] in ids:
        out.append(ids[out[-1]["parent_span_id"]])
    return out


def one(spans: list[dict[str, Any]], service: str, kind: str) -> dict[str, Any]:
    found = [s for s in spans if s["service"] == service and s["kind"] == kind]
    assert len(found) == 1, f"{service} {kind}: {[(s['name'], s['kind']) for s in found]}"
    return found[0]


def complete(trace_id: str, services: set[str], clients: set[str] | None = None) -> Any:
    """Whether the trace holds a SERVER span of each of `services`, and a CLIENT
    span of each of `clients` (by default: those of them that call on)."""
    if clients is None:
        clients = services & {"router", "adapter-qwen2", "adapter-llama3"}

    def check(spans: list[dict[str, Any]]) -> bool:
        mine = [s for s in spans if s["trace_id"] == trace_id]
        return services <= {s["service"] for s in mine if s["kind"] == "SERVER"} and (
            clients <= {s["service"] for s in mine if s["kind"] == "CLIENT"})

    return check


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_an_http_request_is_one_trace_from_envoy_to_the_engine(traced: Traced) -> None:
    traced.double.reset()
    body = {"model_id": "qwen", "inputs": "one two three four",
            "parameters": {"max_new_tokens": 16, "temperature": 0.5}}
    status, _, raw = http_json("POST", f"{traced.envoy.http}/v1/generate",
                               json.dumps(body).encode())
    assert status == 200, raw
    reply = json.loads(raw)
    # The engine got a traceparent, and the trace it names holds every hop.
    sent = traced.double.stats()["last_request"]["traceparent"]
    assert sent and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", sent), sent
    _, trace_id, parent_id, _ = sent.split("-")
    everyone = {"envoy", "router", "adapter-qwen2", "tgi-double"}
    traced.receiver.wait_for(complete(trace_id, everyone))
    spans = traced.receiver.trace(trace_id)

    engine = one(spans, "tgi-double", "SERVER")
    assert engine["parent_span_id"] == parent_id
    hops = chain(spans, engine)
    path = [(s["service"], s["kind"]) for s in hops]
    assert path[:5] == [
        ("tgi-double", "SERVER"),
        ("adapter-qwen2", "CLIENT"),
        ("adapter-qwen2", "SERVER"),
        ("router", "CLIENT"),
        ("router", "SERVER"),
    ], path
    assert {s for s, _ in path[5:]} == {"envoy"}, path
    assert hops[-1]["parent_span_id"] == "", "Envoy's span is the root"
    assert len(spans) == len(hops), [(s["service"], s["name"]) for s in spans]

    router = one(spans, "router", "SERVER")
    adapter = one(spans, "adapter-qwen2", "SERVER")
    for span in (router, adapter):
        attrs = span["attributes"]
        assert span["name"] == "chat qwen2"
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.max_tokens"] == 16
        assert attrs["gen_ai.request.temperature"] == 0.5
        assert attrs["gen_ai.usage.output_tokens"] == reply["tokens"]
        assert attrs["gen_ai.usage.input_tokens"] == reply["input_tokens"]
        assert attrs["gen_ai.response.model"] == reply["model"]
        assert attrs["gen_ai.response.finish_reasons"] == ["eos_token"]
        assert span["status"]["code"] == "UNSET"
    assert router["attributes"]["gen_ai.request.model"] == "qwen"  # as the client named it
    assert adapter["attributes"]["gen_ai.request.model"] == "qwen2"
    assert router["attributes"]["llmmesh.replica"] == traced.adapter.address
    assert router["attributes"]["llmmesh.retries"] == 0
    attempt = one(spans, "router", "CLIENT")
    assert attempt["attributes"]["llmmesh.attempt"] == 1
    assert attempt["attributes"]["llmmesh.replica"] == traced.adapter.address
    http = one(spans, "adapter-qwen2", "CLIENT")
    assert http["attributes"]["http.response.status_code"] == 200
    assert http["attributes"]["url.full"] == f"{traced.double.url}/"

    # Every log line of the request carries its trace: Envoy's access log,
    # the router's and the adapter's lines, the engine's access log.
    def envoy_lines() -> list[str]:  # Envoy writes its access log within a second
        return [x["path"] for x in log_lines(traced.envoy.log) if x.get("trace_id") == trace_id]

    eventually(envoy_lines, timeout=10)
    assert envoy_lines() == ["/v1/generate"]
    engine_lines = [x for x in log_lines(traced.double.log) if x.get("trace_id") == trace_id]
    assert engine_lines, "the engine's log lines of the request carry its trace"
    for part, service in ((traced.router, "router"), (traced.adapter, "adapter-qwen2")):
        lines = [x for x in log_lines(part.log) if x.get("trace_id") == trace_id]
        assert any(x["msg"] == "rpc" and x["method"] == "Generate" for x in lines), service
        span_ids = {s["span_id"] for s in spans if s["service"] == service}
        assert {x["span_id"] for x in lines} <= span_ids


def test_a_stream_span_ends_when_the_stream_does(traced: Traced) -> None:
    traced.double.control(reply=REPLY, token_delay=0.05)
    header, trace_id, _ = traceparent()
    try:
        events = []
        for event in sse_events(f"{traced.envoy.http}/v1/generate_stream",
                                {"model_id": "qwen2", "inputs": "x"},
                                headers={"traceparent": header}):
            events.append((time.time_ns(), event))
    finally:
        traced.double.reset()
    last = events[-1][1]
    assert last["finish_reason"] == "FINISH_REASON_EOS_TOKEN"
    traced.receiver.wait_for(complete(trace_id, {"envoy", "router", "adapter-qwen2"}))
    spans = traced.receiver.trace(trace_id)
    for service in ("router", "adapter-qwen2"):
        span = one(spans, service, "SERVER")
        attrs = span["attributes"]
        assert attrs["gen_ai.usage.output_tokens"] == last["tokens"]
        assert attrs["gen_ai.usage.input_tokens"] == last["input_tokens"]
        # Ten tokens 50 ms apart: the span lasts the whole stream, not its start.
        assert span["end"] - span["start"] >= 9 * 0.05 * 1e9 * 0.9, service
        assert span["end"] >= events[1][0] - 50_000_000, service
        (first,) = [e for e in span["events"] if e["name"] == "first_token"]
        assert span["start"] < first["time"] < span["end"]
        assert first["attributes"]["gen_ai.server.time_to_first_token"] > 0
    # The client's traceparent was honoured: its span is Envoy's parent.
    roots = [s for s in spans if s["parent_span_id"] == header.split("-")[2]]
    assert [s["service"] for s in roots] == ["envoy"]


def test_an_invalid_request_span_carries_the_error_reason(traced: Traced) -> None:
    header, trace_id, _ = traceparent()
    body = {"model_id": "qwen2", "inputs": "x", "parameters": {"top_p": 1.0}}
    status, _, raw = http_json("POST", f"{traced.envoy.http}/v1/generate",
                               json.dumps(body).encode(), headers={"traceparent": header})
    assert status == 400, raw
    traced.receiver.wait_for(complete(trace_id, {"envoy", "router"}, clients=set()))
    spans = traced.receiver.trace(trace_id)
    router = one(spans, "router", "SERVER")
    assert router["status"]["code"] == "ERROR"
    assert router["status"]["message"].startswith("INVALID_ARGUMENT: ")
    assert router["attributes"]["error.type"] == "INVALID_ARGUMENT"
    assert router["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # Refused at the router: no adapter was called.
    assert not [s for s in spans if s["service"] == "adapter-qwen2"]


def test_a_grpc_clients_traceparent_is_the_root(traced: Traced) -> None:
    traced.double.reset()
    header, trace_id, client_span = traceparent()
    reply = stub(traced.envoy.address).Generate(
        pb.GenerateRequest(model_id="qwen2", inputs="red green blue"),
        metadata=[("traceparent", header)], timeout=30)
    sent = traced.double.stats()["last_request"]["traceparent"]
    assert sent.split("-")[1] == trace_id
    traced.receiver.wait_for(complete(trace_id, {"envoy", "router", "adapter-qwen2",
                                                 "tgi-double"}))
    spans = traced.receiver.trace(trace_id)
    hops = chain(spans, one(spans, "tgi-double", "SERVER"))
    assert hops[-1]["service"] == "envoy"
    assert hops[-1]["parent_span_id"] == client_span
    router = one(spans, "router", "SERVER")
    assert router["attributes"]["gen_ai.usage.output_tokens"] == reply.tokens > 0


def test_a_grpc_stream_to_the_router_joins_the_clients_trace(traced: Traced) -> None:
    traced.double.reset()
    header, trace_id, client_span = traceparent()
    messages = list(stub(traced.router.address).GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs="one two"),
        metadata=[("traceparent", header)], timeout=30))
    traced.receiver.wait_for(complete(trace_id, {"router", "adapter-qwen2", "tgi-double"}))
    spans = traced.receiver.trace(trace_id)
    router = one(spans, "router", "SERVER")
    assert router["parent_span_id"] == client_span
    assert router["attributes"]["rpc.method"] == "GenerateStream"
    assert router["attributes"]["gen_ai.usage.output_tokens"] == messages[-1].tokens
    hops = chain(spans, one(spans, "tgi-double", "SERVER"))
    assert hops[-1] is router


def test_an_error_from_the_engine_is_recorded_on_every_hop(traced: Traced) -> None:
    traced.double.control(mode="generation_error")
    header, trace_id, _ = traceparent()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(traced.router.address).Generate(
                pb.GenerateRequest(model_id="qwen2", inputs="x"),
                metadata=[("traceparent", header)], timeout=30)
    finally:
        traced.double.reset()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    traced.receiver.wait_for(complete(trace_id, {"router", "adapter-qwen2", "tgi-double"}))
    spans = traced.receiver.trace(trace_id)
    for service in ("router", "adapter-qwen2"):
        span = one(spans, service, "SERVER")
        assert span["attributes"]["error.type"] == "MODEL_ERROR", service
        assert span["status"]["code"] == "ERROR"
    http = one(spans, "adapter-qwen2", "CLIENT")
    assert http["attributes"]["http.response.status_code"] == 424
    attempt = one(spans, "router", "CLIENT")
    assert attempt["status"]["code"] == "ERROR"


def test_a_stream_the_client_leaves_ends_as_cancelled(traced: Traced) -> None:
    traced.double.control(reply=REPLY, token_delay=0.2)
    header, trace_id, _ = traceparent()
    try:
        call = stub(traced.router.address).GenerateStream(
            pb.GenerateStreamRequest(model_id="qwen2", inputs="x"),
            metadata=[("traceparent", header)], timeout=30)
        assert next(call).text
        call.cancel()
        traced.receiver.wait_for(complete(trace_id, {"router", "adapter-qwen2"}))
    finally:
        traced.double.reset()
    spans = traced.receiver.trace(trace_id)
    for service in ("router", "adapter-qwen2"):
        span = one(spans, service, "SERVER")
        assert span["attributes"]["error.type"] == "CANCELLED", service
        assert span["status"]["code"] == "ERROR"
        assert [e["name"] for e in span["events"]] == ["first_token"]


def test_make_up_passes_the_otel_variables_to_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher (make up) with OTEL_* in its environment: its children
    inherit them, and Envoy's tracer is rendered from them."""
    receiver = OtlpReceiver()
    receiver.start()
    try:
        for key, value in otel_env(receiver, "grpc").items():
            monkeypatch.setenv(key, value)
        header, trace_id, client_span = traceparent()
        with running_mesh(tmp_path) as mesh:
            body = {"model_id": "llama3", "inputs": "hello there"}
            status, _, raw = http_json("POST", f"{mesh.http}/v1/generate",
                                       json.dumps(body).encode(),
                                       headers={"traceparent": header})
            assert status == 200, raw
            receiver.wait_for(complete(trace_id, {"envoy", "router", "adapter-llama3",
                                                  "tgi-double"}))
        spans = receiver.trace(trace_id)
        hops = chain(spans, one(spans, "tgi-double", "SERVER"))
        assert [s["service"] for s in hops] == [
            "tgi-double", "adapter-llama3", "adapter-llama3", "router", "router", "envoy"]
        assert hops[-1]["parent_span_id"] == client_span
    finally:
        receiver.stop()


def test_an_openai_compatible_engine_gets_the_traceparent(
    tmp_path: Path, traced: Traced
) -> None:
    """The adapter over vLLM's OpenAI server (its double) sends the trace on."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    vllm = Part("vllm", python_module("tools.vllm_double", "--port", str(port)),
                tmp_path / "vllm.log", lambda part: wait_http(f"{url}/health", 0.5))
    adapter = AdapterPart("adapter-vllm", tmp_path, "qwen2", traced.double,
                          "--engine", "vllm", "--engine-url", f"{url}/v1")
    adapter.env = otel_env(traced.receiver, "grpc")
    try:
        start_all([vllm, adapter])
        header, trace_id, client_span = traceparent()
        replies = list(stub(adapter.address).GenerateStream(
            pb.GenerateStreamRequest(model_id="qwen2", inputs="one two three"),
            metadata=[("traceparent", header)], timeout=30))
        assert replies[-1].tokens > 0
        with urllib.request.urlopen(f"{url}/_stats", timeout=5) as resp:
            sent = json.loads(resp.read())["last_traceparent"]
        assert sent.split("-")[1] == trace_id
        traced.receiver.wait_for(complete(trace_id, {"adapter-qwen2"}))
        spans = traced.receiver.trace(trace_id)
        server = one(spans, "adapter-qwen2", "SERVER")
        http = one(spans, "adapter-qwen2", "CLIENT")
        assert server["parent_span_id"] == client_span
        assert http["parent_span_id"] == server["span_id"]
        assert sent.split("-")[2] == http["span_id"]
        assert http["attributes"]["url.full"].endswith("/v1/completions")
        assert server["attributes"]["gen_ai.usage.output_tokens"] == replies[-1].tokens
    finally:
        stop_all([vllm, adapter])


def test_the_openai_face_joins_the_trace(tmp_path: Path, traced: Traced) -> None:
    """POST /v1/chat/completions on the router's OpenAI listener: a server span
    under the client's traceparent, and the same hops below it."""
    openai_port = free_port()
    router = RouterPart(tmp_path, {"qwen2": [traced.adapter.address]},
                        "--openai-port", str(openai_port))
    router.env.update(otel_env(traced.receiver, "grpc"))
    try:
        start_all([router])
        header, trace_id, client_span = traceparent()
        body = {"model": "qwen2", "messages": [{"role": "user", "content": "one two"}],
                "max_tokens": 8}
        status, _, raw = http_json(
            "POST", f"http://127.0.0.1:{openai_port}/v1/chat/completions",
            json.dumps(body).encode(),
            headers={"traceparent": header, "Content-Type": "application/json"})
        assert status == 200, raw
        traced.receiver.wait_for(complete(trace_id, {"router", "adapter-qwen2", "tgi-double"}))
        spans = traced.receiver.trace(trace_id)
        hops = chain(spans, one(spans, "tgi-double", "SERVER"))
        assert [(s["service"], s["kind"]) for s in hops][-2:] == [
            ("router", "CLIENT"), ("router", "SERVER")]
        face = hops[-1]
        assert face["name"] == "POST /v1/chat/completions"
        assert face["parent_span_id"] == client_span
        assert face["attributes"]["http.response.status_code"] == 200
        usage = json.loads(raw)["usage"]
        adapter = one(spans, "adapter-qwen2", "SERVER")
        assert adapter["attributes"]["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    finally:
        stop_all([router])
