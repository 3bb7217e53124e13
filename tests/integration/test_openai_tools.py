"""Tool calling through the whole mesh with the official `openai` SDK: Envoy,
the router's OpenAI face, the adapters and two TGI doubles whose output is
each model family's own tool-call text (tests/data/tool_calls names where
every text comes from). Qwen2's adapter renders and parses the Hermes
format, Llama 3.1's its JSON calls."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.harness.mesh import Mesh

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "data" / "tool_calls"
HERMES = json.loads((DATA / "hermes.json").read_text())
LLAMA3 = json.loads((DATA / "llama3_json.json").read_text())
ASK = [{"role": "user", "content": "What's the temperature in San Francisco now?"}]


@pytest.fixture
def client(clean: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{clean.http}/v1", api_key="unused", max_retries=0,
                         timeout=30)


@pytest.fixture
def aclient(clean: Mesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{clean.http}/v1", api_key="unused", max_retries=0,
                              timeout=30)


def adapter_metric(mesh: Mesh, index: int, name: str, **labels: str) -> float:
    """A series of the `index`-th adapter's /metrics (the launcher's order)."""
    url = f"http://127.0.0.1:{mesh.metrics + 1 + index}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def calls_of(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed(client: openai.OpenAI, **request: Any) -> Any:
    """The SDK's own accumulation of a stream (what `.stream()` rebuilds)."""
    with client.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion()


def test_auto_parallel_hermes_calls_whole_and_streamed_alike(
        clean: Mesh, client: openai.OpenAI) -> None:
    case = HERMES["cases"][0]
    clean.doubles["qwen2"].control(reply=case["text"])
    request = {"model": "qwen2", "messages": ASK, "tools": HERMES["tools"]}
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(choice.message) == [(n, json.loads(a)) for n, a in case["calls"]]
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert all(c.type == "function" for c in choice.message.tool_calls)

    final = streamed(client, **request)
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.content is None
    assert calls_of(final.choices[0].message) == calls_of(choice.message)
    # Arguments arrive as the exact text: the accumulated strings are equal.
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == [
        a for _, a in case["calls"]]


def test_stream_chunks_in_openai_shape(clean: Mesh, client: openai.OpenAI) -> None:
    case = HERMES["cases"][1]  # text, then a call
    clean.doubles["qwen2"].control(reply=case["text"])
    chunks = list(client.chat.completions.create(
        model="qwen2", messages=ASK, tools=HERMES["tools"], stream=True))
    state = ChatCompletionStreamState()
    firsts = []
    for chunk in chunks:
        state.handle_chunk(chunk)
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if call.id is not None:
                firsts.append((call.index, call.function.name))
            else:
                assert call.function.name is None  # the name comes once per call
    assert firsts == [(0, "get_current_temperature")]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == case["content"]
    assert "<tool_call>" not in content
    final = state.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert calls_of(final.choices[0].message) == [
        (n, json.loads(a)) for n, a in case["calls"]]


def test_required_is_forced_with_a_grammar(clean: Mesh, client: openai.OpenAI) -> None:
    tool = HERMES["tools"][0]
    call = {"name": "get_current_temperature", "arguments": {"location": "Paris, France"}}
    double = clean.doubles["qwen2"]
    double.control(reply=json.dumps(call))
    answer = client.chat.completions.create(
        model="qwen2", messages=ASK, tools=[tool], tool_choice="required")
    assert answer.choices[0].finish_reason == "tool_calls"
    assert calls_of(answer.choices[0].message) == [(call["name"], call["arguments"])]
    sent = double.stats()["last_request"]["body"]
    grammar = sent["parameters"]["grammar"]
    assert grammar["type"] == "json"
    assert list(grammar["value"]["properties"]) == ["name", "arguments"]
    assert grammar["value"]["properties"]["arguments"] == tool["function"]["parameters"]
    # The tools are in the prompt, in Qwen's own words.
    assert "<tools>" in sent["inputs"] and '"get_current_temperature"' in sent["inputs"]


def test_named_choice_on_llama3_streamed(clean: Mesh, client: openai.OpenAI) -> None:
    call = {"name": "get_current_conditions",
            "arguments": {"location": "Menlo Park, CA", "unit": "Fahrenheit"}}
    clean.doubles["llama3"].control(reply=json.dumps(call))
    request = {"model": "llama3", "messages": ASK, "tools": LLAMA3["tools"],
               "tool_choice": {"type": "function",
                               "function": {"name": "get_current_conditions"}}}
    whole = client.chat.completions.create(**request)
    final = streamed(client, **request)
    for answer in (whole, final):
        assert answer.choices[0].finish_reason == "tool_calls"
        assert calls_of(answer.choices[0].message) == [(call["name"], call["arguments"])]
    assert whole.choices[0].message.tool_calls[0].function.arguments == (
        final.choices[0].message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("case", LLAMA3["cases"], ids=lambda c: c["text"][:24])
def test_llama3_auto_reads_meta_formats(clean: Mesh, client: openai.OpenAI,
                                        case: dict[str, Any]) -> None:
    clean.doubles["llama3"].control(reply=case["text"])
    request = {"model": "llama3", "messages": ASK, "tools": LLAMA3["tools"]}
    whole = client.chat.completions.create(**request).choices[0]
    final = streamed(client, **request).choices[0]
    expected = [(n, json.loads(a)) for n, a in case["calls"]]
    for choice in (whole, final):
        assert calls_of(choice.message) == expected
        assert choice.message.content == case["content"]
        assert choice.finish_reason == ("tool_calls" if expected else "stop")


def test_two_steps_with_a_tool_result(clean: Mesh, client: openai.OpenAI) -> None:
    first, _, answer = HERMES["cases"]
    double = clean.doubles["qwen2"]
    double.control(replies=[first["text"], answer["text"]])
    messages: list[Any] = list(ASK)
    step = client.chat.completions.create(model="qwen2", messages=messages,
                                          tools=HERMES["tools"])
    calls = step.choices[0].message.tool_calls
    assert len(calls) == 2
    messages.append(step.choices[0].message.model_dump(exclude_none=True))
    for call, result in zip(calls, ("26.1", "25.9"), strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    done = client.chat.completions.create(model="qwen2", messages=messages,
                                          tools=HERMES["tools"])
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == answer["content"]
    prompt = double.stats()["last_request"]["body"]["inputs"]
    # The history as Qwen's template writes it: calls, then the results.
    assert prompt.count('<tool_call>\n{"name": "') == 2
    assert "<tool_response>\n26.1\n</tool_response>" in prompt


async def test_async_client(clean: Mesh, aclient: openai.AsyncOpenAI) -> None:
    case = HERMES["cases"][0]
    clean.doubles["qwen2"].control(reply=case["text"])
    answer = await aclient.chat.completions.create(
        model="qwen2", messages=ASK, tools=HERMES["tools"], parallel_tool_calls=False)
    # parallel_tool_calls false keeps the first call.
    assert calls_of(answer.choices[0].message) == [
        (case["calls"][0][0], json.loads(case["calls"][0][1]))]
    async with aclient.chat.completions.stream(
            model="qwen2", messages=ASK, tools=HERMES["tools"]) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert len(final.choices[0].message.tool_calls) == 2


def test_malformed_call_under_auto_is_content_and_counted(
        clean: Mesh, client: openai.OpenAI) -> None:
    text = '<tool_call>\n{"name": "get_current_temperature", "arguments": {"loc\n</tool_call>'
    clean.doubles["qwen2"].control(reply=text)
    before = adapter_metric(clean, 0, "llmmesh_tool_call_malformed_total", model="qwen2",
                            family="hermes")
    answer = client.chat.completions.create(model="qwen2", messages=ASK,
                                            tools=HERMES["tools"])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    assert "get_current_temperature" in (answer.choices[0].message.content or "")
    after = adapter_metric(clean, 0, "llmmesh_tool_call_malformed_total", model="qwen2",
                           family="hermes")
    assert after == before + 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": HERMES["tools"], "tool_choice": {"type": "function",
                                                    "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]},
         "tools[0].function.parameters"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
         "messages[1].tool_call_id"),
        ({"tools": HERMES["tools"], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(
        client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    request = {"model": "qwen2", "messages": ASK, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.param == param, caught.value.body


def test_stop_sequence_left_out_whole_and_streamed(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(reply="1. 1, 2, 3, 4, 5")
    whole = client.chat.completions.create(model="qwen2", messages=ASK, stop="3")
    assert whole.choices[0].message.content == "1. 1, 2, "
    chunks = client.chat.completions.create(model="qwen2", messages=ASK, stop=["3"],
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "1. 1, 2, "


def test_long_agent_conversations_pass(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(reply="fine")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
                for i in range(201)]
    answer = client.chat.completions.create(model="qwen2", messages=messages)
    assert answer.choices[0].message.content == "fine"



def test_a_conversation_over_the_context_is_the_engines_400(
        clean: Mesh, client: openai.OpenAI) -> None:
    # 300 messages of 15 words: within the message cap, over the double's
    # 4,095 input tokens (a token per word).
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": " ".join(["word"] * 15)} for i in range(301)]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen2", messages=messages)
    assert "tokens" in caught.value.message, caught.value.body
