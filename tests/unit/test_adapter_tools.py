"""The adapter's core with tools, against an in-process engine: the tools in
the prompt in the family's format, a forced choice as a grammar, the output
read into calls the same streamed and whole, malformed calls counted."""

import json
from pathlib import Path

import pytest

from services.adapter.chat_template import ChatTemplate
from services.adapter.core import AdapterCore
from services.adapter.tool_calls.types import Tool, ToolCall, ToolChoice
from services.common.errors import MeshError
from services.common.metrics import Metrics
from services.common.registry import load_registry
from services.common.types import (
    Chunk,
    FinishReason,
    Generation,
    GenerationRequest,
    Message,
    Parameters,
)
from tests.fakes.backend import FakeBackend

ROOT = Path(__file__).parents[2]
REGISTRY = load_registry(ROOT / "models" / "registry.yaml", env={})
DATA = ROOT / "tests" / "data" / "tool_calls"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool("get_weather", "The weather in a city.", SCHEMA)
ASK = (Message("user", "Weather in Oslo?"),)


def make(model: str, words: list[str], *, applies_template: bool = False
         ) -> tuple[AdapterCore, FakeBackend, Metrics]:
    backend = FakeBackend(words=words, applies_template=applies_template)
    metrics = Metrics("adapter-test")
    template = ChatTemplate.load(ROOT / "models" / "templates" / f"{model}.jinja")
    return AdapterCore(REGISTRY.get(model), backend, template, metrics), backend, metrics


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def request(model: str, **kw) -> GenerationRequest:
    kw.setdefault("messages", ASK)
    return GenerationRequest(model_id=model, **kw)


async def whole_and_streamed(core: AdapterCore, req: GenerationRequest
                             ) -> tuple[Generation, list[Chunk], Generation]:
    whole = await core.generate(req, timeout=5)
    events = [e async for e in core.generate_stream(req, timeout=5)]
    final = events[-1]
    assert isinstance(final, Generation)
    return whole, [e for e in events if isinstance(e, Chunk)], final


@pytest.mark.parametrize(("model", "family"), [("qwen2", "hermes"), ("llama3", "llama3_json")])
async def test_family_fixtures_become_the_same_calls_streamed_and_whole(model, family):
    data = json.loads((DATA / f"{family}.json").read_text())
    tools = tuple(Tool(t["function"]["name"], t["function"].get("description", ""),
                       t["function"]["parameters"]) for t in data["tools"])
    for case in data["cases"]:
        core, _, _ = make(model, pieces(case["text"]))
        whole, chunks, final = await whole_and_streamed(core, request(model, tools=tools))
        expected = [tuple(c) for c in case["calls"]]
        for answer in (whole, final):
            assert [(c.name, c.arguments) for c in answer.tool_calls] == expected
            assert answer.text == (case["content"] or "")
            assert (answer.finish_reason is FinishReason.TOOL_CALLS) == bool(expected)
        assert "".join(c.text for c in chunks) == final.text
        firsts = [d for c in chunks for d in c.tool_calls if d.id is not None]
        assert [d.id for d in firsts] == [c.id for c in final.tool_calls]
        for index, call in enumerate(final.tool_calls):
            streamed = "".join(d.arguments for c in chunks for d in c.tool_calls
                               if d.index == index)
            assert streamed == call.arguments


async def test_tools_render_in_the_family_format_and_force_a_grammar():
    core, backend, _ = make("llama3", pieces('{"name": "get_weather", "arguments": {"city": '
                                             '"Oslo"}}'))
    answer = await core.generate(request("llama3", tools=(WEATHER,),
                                         tool_choice=ToolChoice("named", "get_weather")),
                                 timeout=5)
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]
    prompt = backend.prompts[0]
    assert "Environment: ipython" in prompt and '"name": "get_weather"' in prompt
    grammar = backend.params[0].grammar
    assert grammar is not None and grammar.schema()["properties"]["arguments"] == SCHEMA


async def test_a_tool_result_renders_and_none_offers_no_tools():
    core, backend, _ = make("qwen2", ["Sunny."])
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    history = (*ASK, Message("assistant", "", (call,)),
               Message("tool", "sunny", tool_call_id="call_1"))
    answer = await core.generate(request("qwen2", messages=history, tools=(WEATHER,),
                                         tool_choice=ToolChoice("none")), timeout=5)
    assert answer.text == "Sunny." and not answer.tool_calls
    prompt = backend.prompts[0]
    assert "<tools>" not in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


async def test_engine_template_gets_plain_messages_and_is_parsed_alike():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    core, backend, _ = make("qwen2", pieces(text), applies_template=True)
    answer = await core.generate(request("qwen2", tools=(WEATHER,)), timeout=5)
    assert [c.name for c in answer.tool_calls] == ["get_weather"]
    (system, user) = backend.prompts[0]
    assert system.role == "system" and "<tools>" in system.content and user == ASK[0]


async def test_malformed_call_is_content_and_counted():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"ci\n</tool_call>'
    core, _, metrics = make("qwen2", pieces(text))
    answer = await core.generate(request("qwen2", tools=(WEATHER,)), timeout=5)
    assert answer.text == text and not answer.tool_calls
    assert answer.finish_reason is FinishReason.EOS_TOKEN
    assert metrics.registry.get_sample_value(
        "llmmesh_tool_call_malformed_total",
        {"service": "adapter-test", "model": "qwen2", "family": "hermes"}) == 1


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"tools": (WEATHER,), "tool_choice": ToolChoice("named", "nope")}, "tool_choice.name"),
        ({"tool_choice": ToolChoice("required")}, "tool_choice"),
        ({"tools": (Tool("bad name!"),)}, "tools[0].name"),
        ({"tools": (Tool("f", "", {"type": "object", "properties": 3}),)},
         "tools[0].parameters"),
        ({"messages": (*ASK, Message("tool", "x", tool_call_id="call_9"))},
         "messages[1].tool_call_id"),
    ],
)
async def test_bad_tool_requests_name_the_field(kw, field):
    core, backend, _ = make("qwen2", ["x"])
    with pytest.raises(MeshError) as caught:
        await core.generate(request("qwen2", **kw), timeout=5)
    assert field in [v.field for v in caught.value.violations]
    assert backend.prompts == []


async def test_a_forced_call_cut_by_the_token_limit_ends_with_length():
    text = '{"name": "get_weather", "arguments": {"city": "Os'
    core, _, metrics = make("qwen2", [*pieces(text), "lo"])
    answer = await core.generate(request("qwen2", tools=(WEATHER,), tool_choice=ToolChoice(
        "required"), parameters=Parameters(max_new_tokens=len(pieces(text)))), timeout=5)
    assert answer.finish_reason is FinishReason.LENGTH
    assert [c.name for c in answer.tool_calls] == ["get_weather"]
    assert answer.tool_calls[0].arguments == '{"city": "Os'
    assert metrics.registry.get_sample_value(
        "llmmesh_tool_call_malformed_total",
        {"service": "adapter-test", "model": "qwen2", "family": "hermes"}) == 1


async def test_engine_with_its_own_tools_gets_them_and_its_calls_pass_through():
    from services.adapter.engines.base import EngineResult, EngineToken
    from services.adapter.tool_calls.engine import EngineTools
    from services.adapter.tool_calls.types import ToolCallDelta

    core, backend, _ = make("qwen2", [], applies_template=True)
    backend.native = frozenset({"auto"})
    call = ToolCall("call_" + "1" * 24, "get_weather", '{"city": "Oslo"}')

    async def generate(prompt, params, timeout):  # type: ignore[no-untyped-def]
        backend.prompts.append(prompt)
        backend.params.append(params)
        return EngineResult("", 3, 7, FinishReason.TOOL_CALLS, tool_calls=(call,))

    async def generate_stream(prompt, params, timeout):  # type: ignore[no-untyped-def]
        yield EngineToken("", 1, tool_calls=(ToolCallDelta(0, "", call.id, call.name),))
        yield EngineToken("", 1, tool_calls=(ToolCallDelta(0, call.arguments),))
        yield EngineResult("", 2, 7, FinishReason.TOOL_CALLS, tool_calls=(call,))

    backend.generate = generate  # type: ignore[method-assign]
    backend.generate_stream = generate_stream  # type: ignore[method-assign]
    whole, chunks, final = await whole_and_streamed(core, request("qwen2", tools=(WEATHER,)))
    prompt = backend.prompts[0]
    assert isinstance(prompt, EngineTools) and prompt.tools == (WEATHER,)
    assert backend.params[0].grammar is None  # the engine forces nothing of the mesh's
    assert whole.tool_calls == final.tool_calls == (call,)
    assert whole.finish_reason is final.finish_reason is FinishReason.TOOL_CALLS
    assert next(d for c in chunks for d in c.tool_calls).name == "get_weather"
    # Its input is bounded with the tools counted in.
    bare, _ = await core.count_tokens(request("qwen2"))
    counted, exact = await core.count_tokens(request("qwen2", tools=(WEATHER,)))
    assert not exact and counted > bare


async def test_a_choice_the_engine_cannot_force_falls_back_to_the_mesh():
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'  # as the grammar forces
    core, backend, _ = make("qwen2", pieces(text), applies_template=True)
    backend.native = frozenset({"none", "auto"})  # as Ollama: no forced choice
    answer = await core.generate(
        request("qwen2", tools=(WEATHER,), tool_choice=ToolChoice("required")), timeout=5)
    assert [c.name for c in answer.tool_calls] == ["get_weather"]
    assert isinstance(backend.prompts[0], tuple)  # Hermes messages, the mesh's parser
    assert backend.params[0].grammar is not None
