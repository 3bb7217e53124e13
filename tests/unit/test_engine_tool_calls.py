"""The normaliser of an engine's own tool calls (tool_calls.engine) and the
request fields for it."""

from __future__ import annotations

import json
import re

from services.adapter.engines.openai_compatible import OpenAICompatibleEngine, _finish
from services.adapter.tool_calls.engine import CallAssembler, EngineTools
from services.adapter.tool_calls.types import Tool, ToolCall, ToolChoice, Turn
from services.common.engine_kinds import KINDS
from services.common.types import FinishReason, Parameters

ID = re.compile(r"^call_[0-9a-f]{24}$")


def merged(deltas):  # type: ignore[no-untyped-def]
    """Deltas accumulated as the openai SDK does: by index."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        if d.id is not None:
            assert not call["id"], "id sent twice"
            call["id"], call["name"] = d.id, d.name
        call["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


def test_message_with_dict_arguments_and_missing_ids() -> None:
    calls = CallAssembler().message({"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris"}}},
        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]})
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[1].arguments == '{"tz": "CET"}'
    assert all(ID.match(c.id) for c in calls) and calls[0].id != calls[1].id
    assert calls[1].id != "chatcmpl-tool-1"  # the mesh's own ids


def test_message_without_calls() -> None:
    assert CallAssembler().message({"role": "assistant", "content": "hi"}) == ()
    assert CallAssembler().message(None) == ()


def test_stream_with_the_name_repeated_in_every_delta() -> None:
    # llama-cpp-python's server: id, name and type in every chunk.
    a = CallAssembler()
    deltas = []
    for piece in ['{"ci', 'ty": "', 'Paris"}']:
        deltas += a.feed([{"index": 0, "id": "call__0_get_weather_x", "type": "function",
                           "function": {"name": "get_weather", "arguments": piece}}])
    assert sum(d.id is not None for d in deltas) == 1
    assert sum(d.name is not None for d in deltas) == 1
    [call] = merged(deltas)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert a.calls == (ToolCall(call["id"], "get_weather", '{"city": "Paris"}'),)


def test_stream_interleaved_parallel_calls() -> None:
    a = CallAssembler()
    deltas = a.feed([{"index": 0, "id": "x", "function": {"name": "f", "arguments": ""}}])
    deltas += a.feed([{"index": 1, "id": "y", "function": {"name": "g", "arguments": '{"b"'}}])
    deltas += a.feed([{"index": 0, "function": {"arguments": '{"a": 1}'}}])
    deltas += a.feed([{"index": 1, "function": {"arguments": ": 2}"}}])
    calls = merged(deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("f", {"a": 1}), ("g", {"b": 2})]
    assert calls[0]["id"] != calls[1]["id"] and all(ID.match(c["id"]) for c in calls)
    assert [c.arguments for c in a.calls] == ['{"a": 1}', '{"b": 2}']


def test_stream_dict_arguments_missing_index_and_late_name() -> None:
    a = CallAssembler()
    # Arguments before the name: held until the name arrives, then sent with it.
    assert a.feed([{"index": 0, "function": {"arguments": '{"q"'}}]) == ()
    deltas = a.feed([{"index": 0, "function": {"name": "search", "arguments": ': "x"}'}}])
    assert len(deltas) == 1 and deltas[0].name == "search"
    assert deltas[0].arguments == '{"q": "x"}'
    # A whole call without an index (TGI-style object arguments): the next call.
    deltas = a.feed([{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}])
    assert deltas[0].index == 1 and json.loads(deltas[0].arguments) == {"a": 1, "b": 2}
    assert [c.name for c in a.calls] == ["search", "add"]


def test_finish_reason_is_tool_calls_when_calls_were_made() -> None:
    assert _finish({"finish_reason": "stop"}, calls=True) is FinishReason.TOOL_CALLS
    assert _finish({"finish_reason": "tool_calls"}) is FinishReason.TOOL_CALLS
    assert _finish({"finish_reason": "length"}, calls=True) is FinishReason.LENGTH
    assert _finish({"finish_reason": "stop"}) is FinishReason.EOS_TOKEN


TOOL = Tool("get_weather", "The weather", {"type": "object",
                                            "properties": {"city": {"type": "string"}}})
HISTORY = (
    Turn("user", "Weather in Paris?"),
    Turn("assistant", "", (ToolCall("call_" + "a" * 24, "get_weather", '{"city": "Paris"}'),)),
    Turn("tool", "sunny", tool_call_id="call_" + "a" * 24),
)


def test_request_fields_and_history_in_openai_shape() -> None:
    engine = OpenAICompatibleEngine("http://e/v1", kind=KINDS["vllm"], served_model="m",
                                    chat_api=True)
    prompt = EngineTools(HISTORY, (TOOL,), ToolChoice("named", "get_weather"), parallel=False)
    route, body = engine.body(prompt, Parameters(), stream=True)
    assert route == "/chat/completions"
    assert body["tools"] == [TOOL.openai()]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assistant, tool = body["messages"][1], body["messages"][2]
    assert assistant["content"] is None
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather",
                                                      "arguments": '{"city": "Paris"}'}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_" + "a" * 24}
    # `none`: no tools offered; the history still goes.
    _, body = engine.body(EngineTools(HISTORY, (TOOL,), ToolChoice("none")), Parameters(), False)
    assert "tools" not in body and "tool_choice" not in body and len(body["messages"]) == 3
    assert "continue_final_message" not in body
    # An answer begun (a resumed stream) is continued, as vLLM wants it said.
    begun = EngineTools((*HISTORY, Turn("assistant", "It is")), (TOOL,), ToolChoice("auto"))
    _, body = engine.body(begun, Parameters(), True)
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_capabilities_by_kind() -> None:
    def engine(kind: str, chat: bool = True) -> OpenAICompatibleEngine:
        return OpenAICompatibleEngine("http://e/v1", kind=KINDS[kind], chat_api=chat)

    required, auto = ToolChoice("required"), ToolChoice("auto")
    assert engine("vllm").native_tools(required)
    assert not engine("vllm", chat=False).native_tools(auto)  # chat_api: mesh
    assert engine("llamacpp").native_tools(ToolChoice("named", "f"))
    assert not engine("llamacpp").native_tools(required)
    assert engine("ollama").native_tools(auto)
    assert not engine("ollama").native_tools(ToolChoice("named", "f"))
    # Ollama takes tools but no tool_choice field.
    _, body = engine("ollama").body(EngineTools(HISTORY, (TOOL,), auto), Parameters(), False)
    assert "tools" in body and "tool_choice" not in body
