"""The OpenAI Agents SDK running a one-tool agent over the Responses API
translation: its requests go through `translate_request` (and the tool checks
a chat request gets), a scripted chat-level engine answers, and its replies
come back as `build_response` objects or `ResponseEvents` streams."""

import asyncio
import json

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI

from services.adapter.tool_calls.request import check_tool_results, parse_tool_calls, parse_tools
from services.adapter.tool_calls.types import Turn
from services.openai.responses_api import (
    ResponseEvents,
    build_response,
    encode_event,
    translate_request,
)

agents = pytest.importorskip("agents")


def _engine(chat):
    """A chat-level engine: calls the tool first, then answers with its result."""
    messages = chat["messages"]
    turns = []
    for i, m in enumerate(messages):
        calls, bad = parse_tool_calls(m.get("tool_calls"), f"messages[{i}].tool_calls")
        assert not bad
        turns.append(Turn(m["role"], m.get("content") or "", calls, m.get("tool_call_id", "")))
    assert not check_tool_results(turns)
    tools, bad = parse_tools(chat.get("tools"))
    assert not bad and [t.name for t in tools] == ["get_weather"]
    results = [m for m in messages if m["role"] == "tool"]
    if results:
        message = {"role": "assistant", "content": f"It is {results[-1]['content']} in Oslo."}
        finish = "stop"
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_w1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
        finish = "tool_calls"
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen2",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def _chunks(completion):
    """The same answer as chat completion chunks."""
    message = completion["choices"][0]["message"]
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "qwen2"}
    out = []
    if message.get("content"):
        text = message["content"]
        out += [dict(base, choices=[{"index": 0, "delta": {"content": text[i:i + 4]},
                                     "finish_reason": None}]) for i in range(0, len(text), 4)]
    for i, call in enumerate(message.get("tool_calls") or []):
        head = dict(call, index=i, function={"name": call["function"]["name"], "arguments": ""})
        out.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [head]},
                                        "finish_reason": None}]))
        args = call["function"]["arguments"]
        out += [dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
            {"index": i, "function": {"arguments": args[j:j + 5]}}]}, "finish_reason": None}])
            for j in range(0, len(args), 5)]
    out.append(dict(base, choices=[{"index": 0, "delta": {},
                                    "finish_reason": completion["choices"][0]["finish_reason"]}]))
    out.append(dict(base, choices=[], usage=completion["usage"]))
    return out


def _client(seen):
    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        translated = translate_request(body)
        completion = _engine(translated.chat)
        if not translated.stream:
            return httpx.Response(200, json=build_response(completion, translated))
        events = ResponseEvents(translated, model="qwen2")
        out = events.start()
        for chunk in _chunks(completion):
            out += events.chunk(chunk)
        out += events.finish()
        return httpx.Response(200, content=b"".join(encode_event(e) for e in out),
                              headers={"content-type": "text/event-stream"})

    return AsyncOpenAI(api_key="x", base_url="http://mesh/v1", max_retries=0,
                       http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("streamed", [False, True])
def test_one_tool_agent(streamed):
    agents.set_tracing_disabled(True)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return "4°C"

    seen = []
    model = agents.OpenAIResponsesModel(model="qwen2", openai_client=_client(seen))
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                         model=model)

    async def run():
        if not streamed:
            return await agents.Runner.run(agent, "Weather in Oslo?")
        result = agents.Runner.run_streamed(agent, "Weather in Oslo?")
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert called == ["Oslo"]
    assert result.final_output == "It is 4°C in Oslo."
    assert len(seen) == 2
    # What the Agents SDK sends: no `store` unless its settings set it, and the
    # second turn carries the call and its output as items.
    assert all("store" not in body and "previous_response_id" not in body for body in seen)
    kinds = [item.get("type") for item in seen[1]["input"]]
    assert "function_call" in kinds and "function_call_output" in kinds
