"""Tool calls on the wire: the native proto's fields both ways, and OpenAI's
reply and chunk shapes with calls."""

from __future__ import annotations

import pytest
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.tool_calls.types import Tool, ToolCall, ToolCallDelta, ToolChoice
from services.common import pb_convert
from services.common.errors import MeshError
from services.common.types import Chunk, FinishReason, Generation, GenerationRequest, Message
from services.openai import responses
from services.openai.requests import parse_chat

CALL = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize("cls", [pb.GenerateRequest, pb.GenerateStreamRequest])
def test_request_round_trip(cls):
    request = GenerationRequest(
        model_id="qwen2",
        messages=(Message("user", "Weather?"), Message("assistant", "", (CALL,)),
                  Message("tool", "sunny", tool_call_id="call_1")),
        tools=(Tool("get_weather", "The weather.", SCHEMA, strict=True),),
        tool_choice=ToolChoice("named", "get_weather"),
        parallel_tool_calls=False,
    )
    wire = pb_convert.request_to_pb(request, cls)
    assert wire.tool_choice.mode == pb.ToolChoice.MODE_NAMED
    back = pb_convert.request_from_pb(cls.FromString(wire.SerializeToString()))
    assert back == request
    # Schema keys keep their order through the JSON text.
    assert list(back.tools[0].parameters) == list(SCHEMA)


def test_request_without_tools_stays_as_before():
    request = GenerationRequest(model_id="qwen2", messages=(Message("user", "Hi"),))
    wire = pb_convert.request_to_pb(request, pb.GenerateRequest)
    assert not wire.HasField("tool_choice") and not wire.HasField("parallel_tool_calls")
    assert pb_convert.request_from_pb(wire) == request


def test_a_schema_that_is_no_json_is_refused_by_field():
    wire = pb.GenerateRequest(model_id="qwen2", tools=[pb.Tool(name="f", parameters_json="{")])
    with pytest.raises(MeshError) as caught:
        pb_convert.request_from_pb(wire)
    assert caught.value.violations[0].field == "tools[0].parameters_json"


def test_reply_and_stream_events_carry_calls():
    result = Generation("Checking.", "Qwen2", "qwen2", 9, 5, FinishReason.TOOL_CALLS,
                        tool_calls=(CALL,))
    assert pb_convert.generation_from_pb(pb_convert.generation_to_pb(result)) == result
    final = pb_convert.stream_event_from_pb(pb_convert.final_to_pb(result))
    assert final == result
    chunk = Chunk("", 3, tool_calls=(ToolCallDelta(0, "", "call_1", "get_weather"),
                                     ToolCallDelta(0, '{"city"')))
    assert pb_convert.stream_event_from_pb(pb_convert.chunk_to_pb(chunk)) == chunk


def test_openai_reply_with_calls_has_null_content():
    result = Generation("", "Qwen2", "qwen2", 9, 5, FinishReason.TOOL_CALLS,
                        tool_calls=(CALL,))
    body = responses.completion("chat", result, id="chatcmpl-1", created=1)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


def test_openai_chunks_name_a_call_once():
    shapes = responses.ChunkShapes("chat", "qwen2", include_usage=False)
    first = shapes.first("", calls=(ToolCallDelta(0, "", "call_1", "get_weather"),))
    assert first["choices"][0]["delta"] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}]}
    more = shapes.text("", calls=(ToolCallDelta(0, '{"city"'),))
    assert more["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}
    last = shapes.last(Generation("", "Q", "qwen2", 1, 1, FinishReason.TOOL_CALLS,
                        tool_calls=(CALL,)))
    assert last["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_request_reads_tools_and_history():
    parsed = parse_chat({
        "model": "qwen2", "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": SCHEMA}}],
        "tool_choice": "required",
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL.openai()]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    })
    generation = parsed.generation
    assert generation.tools == (Tool("get_weather", "", SCHEMA),)
    assert generation.tool_choice == ToolChoice("required")
    assert generation.parallel_tool_calls is False
    assert generation.messages[1] == Message("assistant", "", (CALL,))
    assert generation.messages[2] == Message("tool", "sunny", tool_call_id="call_1")


def test_openai_messages_bounded_only_to_bound_parsing():
    many = [{"role": "user", "content": "x"}] * 1000
    assert len(parse_chat({"model": "qwen2", "messages": many}).generation.messages) == 1000
    with pytest.raises(MeshError) as caught:
        parse_chat({"model": "qwen2", "messages": [*many, {"role": "user", "content": "y"}]})
    assert caught.value.violations[0].field == "messages"
