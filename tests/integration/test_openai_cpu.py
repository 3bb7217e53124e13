"""The official `openai` SDK against `make up`'s entry point with the real CPU
backends (llama.cpp + SmolLM2), on free ports: real text, real token counts,
and structured output that parses and validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.harness.mesh import free_run, launch, stop_launcher
from tests.harness.procs import free_port

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Name three colors."}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    tmp: Path = tmp_path_factory.mktemp("openai-cpu")
    envoy: list[int] = []

    def args() -> list[str]:
        envoy[:] = [free_port()]
        return [
            "--run-dir", str(tmp / "run"),
            "--envoy-port", str(envoy[0]), "--admin-port", str(free_port()),
            "--router-port", str(free_port()), "--openai-port", str(free_port()),
            "--adapter-port", str(free_run(2)), "--backend-port", str(free_run(2)),
            "--metrics-port", str(free_run(3)), "--no-prometheus",
        ]

    launcher = launch(tmp / "launcher.log", args, 240)
    try:
        yield f"http://127.0.0.1:{envoy[0]}/v1"
    finally:
        stop_launcher(launcher)


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)


def test_models_tell_the_backend(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["qwen2", "llama3"]
    assert {m.model_extra["backend_model"] for m in models} == {"SmolLM2-135M-Instruct"}
    assert client.models.retrieve("qwen2").model_extra["max_total_tokens"] > 0


async def test_chat_streamed_and_not_give_the_same_greedy_text(base_url: str) -> None:
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    whole = await aclient.chat.completions.create(
        model="llama3", messages=QUESTION, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content or ""
    assert len(text.split()) >= 3, text  # SmolLM2 answers in words
    assert whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage is not None and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24
    stream = await aclient.chat.completions.create(
        model="llama3", messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_completion_of_a_raw_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="qwen2", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage is not None and reply.usage.completion_tokens <= 8


def test_json_schema_answer_parses_and_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="qwen2", temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Invent a person: a name and an age."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    )
    answer = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(answer, SCHEMA)
    reply = client.chat.completions.create(
        model="llama3", temperature=0, max_tokens=48, messages=QUESTION,
        response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_top_logprobs_from_the_cpu_backend(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="qwen2", messages=QUESTION, temperature=0, max_tokens=12, logprobs=True,
        top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        best = token.top_logprobs[0]
        # Greedy: the chosen token is the most likely one, and its logprob the max.
        assert best.token == token.token
        assert token.logprob == pytest.approx(max(a.logprob for a in token.top_logprobs))
        assert all(a.logprob <= 0 for a in token.top_logprobs)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_validates_against_its_schema(
        client: openai.OpenAI, stream: bool) -> None:
    """SmolLM2 answers with a call whatever it learnt: the grammar of
    `required` holds it to the tool's schema."""
    request = {"model": "qwen2", "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
               "tool_choice": "required",
               "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    if stream:
        with client.chat.completions.stream(**request) as events:
            for _ in events:
                pass
            answer = events.get_final_completion()
    else:
        answer = client.chat.completions.create(**request)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
