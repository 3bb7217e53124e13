"""Tool calling by the engine itself (`chat_api: engine`), through the whole
mesh: llama3 on the vLLM double (tools/vllm_double.py answers calls in
vLLM's shapes), qwen2 on llama-cpp-python's real server with its
`chatml-function-calling` format; adapters, router and Envoy are the real
processes, the client is the openai SDK.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests.harness.engine_parts import (
    EngineAdapterPart,
    LlamaServerPart,
    VLLMPart,
    gguf,
)
from tests.harness.parts import EnvoyPart, start_all, start_edge, stop_all

pytestmark = pytest.mark.integration
ID = re.compile(r"^call_[0-9a-f]{24}$")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@dataclass
class ToolMesh:
    llama: LlamaServerPart
    vllm: VLLMPart
    envoy: EnvoyPart

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.envoy.http}/v1", api_key="none",
                             max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolMesh]:
    tmp = tmp_path_factory.mktemp("engine-tools")
    llama = LlamaServerPart(tmp, "llama-server", "--chat_format", "chatml-function-calling")
    vllm = VLLMPart(tmp, "vllm", "--max-model-len", "1024", "--token-delay", "0.005")
    start_all([llama, vllm])
    adapters = {
        "qwen2": EngineAdapterPart(tmp, "adapter-qwen2", "qwen2", "--engine", "llamacpp",
                                   "--engine-url", llama.url, "--chat-api", "engine"),
        "llama3": EngineAdapterPart(tmp, "adapter-llama3", "llama3", "--engine", "vllm",
                                    "--engine-url", f"{vllm.url}/v1", "--chat-api", "engine"),
    }
    start_all(list(adapters.values()))
    router, envoy = start_edge(tmp, {m: [a.address] for m, a in adapters.items()})
    parts = [llama, vllm, *adapters.values(), router, envoy]
    try:
        yield ToolMesh(llama, vllm, envoy)
    finally:
        stop_all(parts)


def calls_of(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls or ()]


def test_vllm_calls_streamed_equal_the_whole_answer(mesh: ToolMesh) -> None:
    client = mesh.client()
    ask: dict[str, Any] = {
        "model": "llama3", "max_tokens": 64, "tools": [WEATHER, TIME],
        "messages": [{"role": "user", "content": "get_weather and get_time for Paris"}]}
    whole = client.chat.completions.create(**ask)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"}),
                                        ("get_time", {"city": "Paris"})]
    assert all(ID.match(c.id) for c in choice.message.tool_calls or ())
    sent = mesh.vllm.stats()["last_body"]
    assert sent["tools"] == [WEATHER, TIME] and sent["tool_choice"] == "auto"

    with client.chat.completions.stream(**ask) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert calls_of(streamed.message) == calls_of(choice.message)
    assert all(ID.match(c.id) for c in streamed.message.tool_calls or ())


def test_vllm_named_choice_repeating_the_name_and_history(mesh: ToolMesh) -> None:
    """vLLM's named-function path repeats the name in each delta, sends no id
    and ends with `stop`: the mesh sends one name and id and says tool_calls."""
    client = mesh.client()
    messages: list[Any] = [{"role": "user", "content": "What is it like in Rome"}]
    ask: dict[str, Any] = {"model": "llama3", "max_tokens": 64, "tools": [WEATHER, TIME],
                           "tool_choice": {"type": "function",
                                           "function": {"name": "get_time"}}}
    raw = client.chat.completions.create(messages=messages, stream=True, **ask)
    deltas = [d for chunk in raw for c in chunk.choices for d in c.delta.tool_calls or ()]
    assert sum(d.function is not None and d.function.name is not None for d in deltas) == 1
    assert sum(d.id is not None for d in deltas) == 1
    whole = client.chat.completions.create(messages=messages, **ask).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert calls_of(whole.message) == [("get_time", {"city": "Rome"})]

    # The call and its result go back in OpenAI's shape; vLLM answers in text.
    call = whole.message.tool_calls[0]  # type: ignore[index]
    messages += [whole.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "noon"}]
    reply = client.chat.completions.create(model="llama3", messages=messages,
                                           tools=[WEATHER, TIME], max_tokens=64)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    sent = mesh.vllm.stats()["last_body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "noon"}


def test_llama_cpp_named_choice_streamed_and_not(mesh: ToolMesh) -> None:
    """llama-cpp-python's server repeats id and name in every delta."""
    gguf()
    client = mesh.client()
    ask: dict[str, Any] = {
        "model": "qwen2", "max_tokens": 48, "temperature": 0, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls or []
    assert ID.match(call.id) and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)

    raw = client.chat.completions.create(stream=True, **ask)
    deltas, finish = [], None
    for chunk in raw:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert [d.function.name for d in deltas if d.function and d.function.name] == [
        "get_weather"]
    assert len({d.id for d in deltas if d.id}) == 1 and {d.index for d in deltas} == {0}
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert isinstance(json.loads(arguments), dict)


def test_llama_cpp_required_falls_back_to_the_meshs_grammar(mesh: ToolMesh) -> None:
    """llama-cpp-python cannot force `required`: the mesh renders the tools
    and enforces the call itself, and the answer has the same shape."""
    client = mesh.client()
    whole = client.chat.completions.create(
        model="qwen2", max_tokens=64, temperature=0, tools=[WEATHER], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}]).choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls or []
    assert ID.match(call.id) and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)
