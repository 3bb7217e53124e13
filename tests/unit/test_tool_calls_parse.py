"""Tool-call parsing: each family's real call text, whole and streamed, and the
OpenAI SDK's own accumulator rebuilding the unstreamed answer from the deltas."""

import itertools
import json
from pathlib import Path

import pytest
from jsonschema import validate
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from services.adapter.tool_calls.grammar import calls_schema
from services.adapter.tool_calls.parse import Delta, StreamParser, parse, partial_suffix
from services.adapter.tool_calls.render import Family
from services.adapter.tool_calls.request import parse_tools
from services.adapter.tool_calls.types import ToolChoice

DATA = Path(__file__).parents[1] / "data" / "tool_calls"


def _load(name):
    spec = json.loads((DATA / f"{name}.json").read_text())
    tools, bad = parse_tools(spec["tools"])
    assert not bad
    return Family(spec["family"]), tools, spec["cases"]


CASES = [(name, i) for name in ("hermes", "llama3_json", "generic")
         for i in range(len(_load(name)[2]))]


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _stream(family, tools, text, size, choice=None):
    parser = StreamParser(family, tools, choice or ToolChoice(), new_id=_ids())
    deltas = []
    for i in range(0, len(text), size):
        deltas += parser.feed(text[i:i + size])
    deltas += parser.finish()
    return parser, deltas


def _chunks(deltas, finish_reason):
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": None},
                                "finish_reason": None}])]
    for d in deltas:
        delta = {"content": d.content} if d.content else {
            "tool_calls": [c.openai() for c in d.tool_calls]}
        out.append(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish_reason}]))
    return [ChatCompletionChunk.model_validate(c) for c in out]


@pytest.mark.parametrize(("name", "case"), CASES)
def test_family_fixture_whole(name, case):
    family, tools, cases = _load(name)
    spec = cases[case]
    counted = []
    parsed = parse(family, spec["text"], tools, on_malformed=counted.append)
    assert parsed.content == spec["content"]
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [tuple(c)
                                                                  for c in spec["calls"]]
    assert parsed.malformed == len(counted) == spec.get("malformed", 0)
    for call in parsed.tool_calls:
        assert call.id.startswith("call_") and json.loads(call.arguments)
    assert len({c.id for c in parsed.tool_calls}) == len(parsed.tool_calls)
    assert parsed.finish_reason == ("tool_calls" if spec["calls"] else None)


@pytest.mark.parametrize(("name", "case"), CASES)
@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_sdk_accumulator_rebuilds_the_whole_answer(name, case, size):
    family, tools, cases = _load(name)
    text = cases[case]["text"]
    whole = parse(family, text, tools, new_id=_ids())
    _, deltas = _stream(family, tools, text, size)
    state = ChatCompletionStreamState()
    for chunk in _chunks(deltas, whole.finish_reason or "stop"):
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    assert message.content == whole.content
    got = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert got == [(c.id, c.name, c.arguments) for c in whole.tool_calls]
    # id, type and name once per call; never markup in content.
    heads = [c for d in deltas for c in d.tool_calls if c.id is not None]
    assert len(heads) == len(whole.tool_calls)
    if whole.tool_calls:
        for d in deltas:
            assert "<tool_call" not in d.content and "python_tag" not in d.content
        assert not any(c.name for d in deltas for c in d.tool_calls if c.id is None)


def test_only_a_possible_marker_start_is_held_back():
    _, tools, _ = _load("hermes")
    parser = StreamParser(Family.HERMES, tools)
    assert parser.feed("x < y and <tool") == [Delta(content="x < y and")]
    assert parser.feed("s are fun") == [Delta(content=" <tools are fun")]
    assert parser.finish() == []


def test_partial_suffix():
    assert partial_suffix("abc<tool_c", ["<tool_call>"]) == 7
    assert partial_suffix("abc<tool_call>", ["<tool_call>"]) == 0
    assert partial_suffix("abc", ["<tool_call>"]) == 0
    assert partial_suffix("a<", ["<tool_call>", "<|python_tag|>"]) == 1


def test_unknown_tool_or_bad_arguments_is_content_and_counted():
    _, tools, _ = _load("hermes")
    for body in ('{"name": "rm_rf", "arguments": {}}', '{"name": "get_current_temperature", '
                 '"arguments": [1]}', "not json at all"):
        text = f"ok <tool_call>{body}</tool_call>"
        counted = []
        parsed = parse(Family.HERMES, text, tools, on_malformed=counted.append)
        assert parsed.content == text and parsed.tool_calls == () and len(counted) == 1


def test_unclosed_call_at_the_end_still_counts_when_valid():
    _, tools, _ = _load("generic")
    parsed = parse(Family.GENERIC, '<tool_call>{"name": "get_time", "arguments": '
                   '{"city": "Oslo"}}', tools)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_time",
                                                                   '{"city": "Oslo"}')]
    assert parsed.content is None


def test_arguments_sent_as_a_json_string_are_decoded_once():
    _, tools, _ = _load("generic")
    parsed = parse(Family.GENERIC, '<tool_call>{"name": "get_time", "arguments": '
                   '"{\\"city\\": \\"Oslo\\"}"}</tool_call>', tools)
    assert parsed.tool_calls[0].arguments == '{"city": "Oslo"}'


def test_tool_choice_none_passes_markup_through():
    _, tools, _ = _load("hermes")
    text = '<tool_call>{"name": "get_current_temperature", "arguments": {}}</tool_call>'
    parsed = parse(Family.HERMES, text, tools, ToolChoice("none"))
    assert parsed.content == text and parsed.tool_calls == ()


def test_llama_json_content_that_is_not_a_call_is_plain_content():
    _, tools, _ = _load("llama3_json")
    parsed = parse(Family.LLAMA3_JSON, '{"answer": 42}', tools)
    assert parsed.content == '{"answer": 42}' and parsed.malformed == 0
    parsed = parse(Family.LLAMA3_JSON, "Sure: {\"name\": 1}", tools)
    assert parsed.content == "Sure: {\"name\": 1}" and parsed.malformed == 0


def test_ids_are_unique_across_answers():
    _, tools, cases = _load("hermes")
    ids = [c.id for _ in range(50) for c in parse(Family.HERMES, cases[0]["text"],
                                                  tools).tool_calls]
    assert len(set(ids)) == len(ids) == 100


def test_forced_call_streams_its_arguments_incrementally():
    _, tools, _ = _load("generic")
    choice = ToolChoice("required")
    text = '{"name": "get_weather", "arguments": {"city": "New York", "x": {"y": "}"}}}'
    parser, deltas = _stream(Family.GENERIC, tools, text, 1, choice)
    pieces = [c.arguments for d in deltas for c in d.tool_calls if c.id is None]
    assert len(pieces) > 5
    whole = parse(Family.GENERIC, text, tools, choice)
    expected = '{"city": "New York", "x": {"y": "}"}}'
    assert "".join(pieces) == whole.tool_calls[0].arguments == expected
    assert parser.malformed == 0
    validate(json.loads(text), calls_schema(tools, choice))


def test_forced_call_cut_short_is_counted_not_raised():
    _, tools, _ = _load("generic")
    counted = []
    parsed = parse(Family.GENERIC, '{"name": "get_weather", "arguments": {"city": "Ne', tools,
                   ToolChoice("named", "get_weather"), on_malformed=counted.append)
    assert parsed.tool_calls[0].name == "get_weather"
    assert parsed.tool_calls[0].arguments == '{"city": "Ne'
    assert len(counted) == 1


def test_no_tools_means_no_parsing():
    parser = StreamParser(Family.HERMES, ())
    assert parser.feed("<tool_call>") == [Delta(content="<tool_call>")]


def test_parallel_tool_calls_false_keeps_the_first_call():
    _, tools, cases = _load("hermes")
    parsed = parse(Family.HERMES, cases[0]["text"], tools, parallel=False)
    assert [c.name for c in parsed.tool_calls] == ["get_current_temperature"]
    assert parsed.content is None and parsed.malformed == 0
