"""Tool calling on the native API: HTTP/JSON through Envoy's transcoder and
gRPC to the router, over a TGI double that writes Qwen's own call text."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc

from tests.harness.mesh import Mesh
from tests.harness.parts import http_json, sse_events

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
BODY: dict[str, Any] = {
    "model_id": "qwen2",
    "messages": [{"role": "user", "content": "Weather in Oslo?"}],
    "tools": [{"name": "get_weather", "description": "The weather in a city.",
               "parameters_json": json.dumps(SCHEMA)}],
}


def post(mesh: Mesh, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, raw = http_json("POST", f"{mesh.http}{path}", json.dumps(body).encode(),
                               {"content-type": "application/json"})
    return status, json.loads(raw)


def test_http_json_reply_and_stream_carry_the_calls(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(reply="Checking.\n" + CALL)
    status, reply = post(clean, "/v1/generate", BODY)
    assert status == 200, reply
    assert reply["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    assert reply["generated_text"] == "Checking."
    (call,) = reply["tool_calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Oslo"}
    assert call["id"].startswith("call_")

    events = list(sse_events(f"{clean.http}/v1/generate_stream", BODY))
    pieces = [d for e in events[:-1] for d in e.get("tool_calls", [])]
    assert pieces[0]["name"] == "get_weather" and pieces[0]["id"].startswith("call_")
    assert "".join(p.get("arguments", "") for p in pieces) == call["arguments"]
    assert "".join(e.get("text", "") for e in events[:-1]) == "Checking."
    last = events[-1]
    assert last["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    assert [(c["name"], c["arguments"]) for c in last["tool_calls"]] == [
        ("get_weather", call["arguments"])]


def test_grpc_forced_choice_and_a_tool_result(clean: Mesh) -> None:
    double = clean.doubles["qwen2"]
    double.control(replies=['{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                            "Sunny in Oslo."])
    tool = pb.Tool(name="get_weather", parameters_json=json.dumps(SCHEMA))
    with grpc.insecure_channel(clean.router) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        first = stub.Generate(pb.GenerateRequest(
            model_id="qwen2", messages=[pb.ChatMessage(role="user", content="Weather?")],
            tools=[tool], tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)),
            timeout=10)
        assert first.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        (call,) = first.tool_calls
        assert double.stats()["last_request"]["body"]["parameters"]["grammar"]["type"] == "json"
        second = stub.Generate(pb.GenerateRequest(
            model_id="qwen2", tools=[tool], messages=[
                pb.ChatMessage(role="user", content="Weather?"),
                pb.ChatMessage(role="assistant", tool_calls=[call]),
                pb.ChatMessage(role="tool", tool_call_id=call.id, content="sunny")]),
            timeout=10)
        assert second.generated_text == "Sunny in Oslo."
        assert second.finish_reason == pb.FINISH_REASON_EOS_TOKEN
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(
                model_id="qwen2", tools=[tool], messages=[
                    pb.ChatMessage(role="user", content="Weather?"),
                    pb.ChatMessage(role="tool", tool_call_id="call_none", content="x")]),
                timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages[1].tool_call_id" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tool_choice": {"mode": "MODE_NAMED", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [{"name": "f", "parameters_json": '{"type": "object", "properties": 3}'}]},
         "tools[0].parameters"),
        ({"tools": [{"name": "f", "parameters_json": "{not json"}]},
         "tools[0].parameters_json"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(clean: Mesh, change: dict[str, Any],
                                             field: str) -> None:
    status, reply = post(clean, "/v1/generate", {**BODY, **change})
    assert status == 400, reply
    fields = [v["field"] for d in reply["details"] for v in d.get("field_violations", [])]
    assert field in fields, reply
