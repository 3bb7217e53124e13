"""Agent clients through the whole mesh (Envoy, the OpenAI face, Qwen2's
adapter, a TGI double that writes Qwen's own tool-call text): the `openai`
SDK's Responses API, the OpenAI Agents SDK running a one-tool agent over
`/v1/responses`, LangChain's `bind_tools` and an agent loop, and OpenAI's
404 on paths the mesh does not serve."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.harness.mesh import Mesh

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def hermes_call(name: str, **arguments: Any) -> str:
    """A call as Qwen2 writes it (Qwen's function-calling guide)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.fixture
def client(clean: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{clean.http}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def test_responses_api_function_call_whole_and_streamed(
        clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(reply=hermes_call("get_weather", city="Oslo"))
    tool = {"type": "function", **WEATHER["function"]}
    whole = client.responses.create(model="qwen2", input="Weather in Oslo?", tools=[tool],
                                    store=False)
    assert whole.status == "completed"
    (item,) = whole.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Oslo"}
    with client.responses.stream(model="qwen2", input="Weather in Oslo?", tools=[tool],
                                 store=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    (streamed,) = final.output
    assert (streamed.name, streamed.arguments) == (item.name, item.arguments)


def test_responses_api_text_and_stateless_refusal(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(reply="Hello from the mesh")
    answer = client.responses.create(model="qwen2", input="Say hi", instructions="Be brief.",
                                     max_output_tokens=20)
    assert answer.output_text == "Hello from the mesh"
    # Four words and the end-of-sequence token, as the double counts them.
    assert answer.usage is not None and answer.usage.output_tokens == 5
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="qwen2", input="Hi", previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id"


async def test_agents_sdk_runs_a_one_tool_agent(clean: Mesh) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    double = clean.doubles["qwen2"]
    called: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return "sunny"

    model = agents.OpenAIResponsesModel(
        model="qwen2", openai_client=openai.AsyncOpenAI(
            base_url=f"{clean.http}/v1", api_key="unused", max_retries=0, timeout=30))
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                         model=model)

    async def run(streamed: bool) -> Any:
        double.control(replies=[hermes_call("get_weather", city="Oslo"),
                                "It is sunny in Oslo."])
        if not streamed:
            return await agents.Runner.run(agent, "Weather in Oslo?")
        result = agents.Runner.run_streamed(agent, "Weather in Oslo?")
        async for _ in result.stream_events():
            pass
        return result

    for streamed in (False, True):
        result = await run(streamed)
        assert result.final_output == "It is sunny in Oslo."
        prompt = double.stats()["last_request"]["body"]["inputs"]
        assert "<tool_response>\nsunny\n</tool_response>" in prompt
    assert called == ["Oslo", "Oslo"]


def test_langchain_bind_tools_and_an_agent_loop(clean: Mesh) -> None:
    chat_models = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"rainy in {city}"

    llm = chat_models.ChatOpenAI(model="qwen2", base_url=f"{clean.http}/v1", api_key="unused",
                                 max_retries=0, timeout=30)
    bound = llm.bind_tools([get_weather])
    clean.doubles["qwen2"].control(replies=[hermes_call("get_weather", city="Bergen"),
                                            "It is rainy in Bergen."])
    messages: list[Any] = [HumanMessage("Weather in Bergen?")]
    # The agent loop: call the model, run the tools it asks for, until it answers.
    for _ in range(3):
        reply = bound.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            assert call["name"] == "get_weather" and call["args"] == {"city": "Bergen"}
            messages.append(ToolMessage(get_weather.invoke(call["args"]),
                                        tool_call_id=call["id"]))
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[-1].content == "It is rainy in Bergen."
    prompt = clean.doubles["qwen2"].stats()["last_request"]["body"]["inputs"]
    assert "<tool_response>\nrainy in Bergen\n</tool_response>" in prompt
    # Streamed, LangChain rebuilds the same call from the chunks.
    clean.doubles["qwen2"].control(reply=hermes_call("get_weather", city="Bergen"))
    chunks = list(bound.stream([HumanMessage("Weather in Bergen?")]))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        ("get_weather", {"city": "Bergen"})]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/audio/speech", "/v1/files"])
def test_other_openai_paths_are_openai_404s(client: openai.OpenAI, path: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.post(path, body={"model": "qwen2", "input": "x"}, cast_to=dict)
    body = caught.value.body
    assert isinstance(body, dict) and "unknown route" in body["message"], body


def test_responses_stream_failing_after_the_start_ends_with_an_error_event(
        clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(reply="one two three four five", mode="generation_error",
                                   after_tokens=2)
    with client.responses.stream(model="qwen2", input="Count.", store=False) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    # The Responses API's own error event ends it (the SDK yields it as one).
    assert kinds[-1] == "error" and "response.completed" not in kinds
    assert events[-1].code == "model_error" and events[-1].message
