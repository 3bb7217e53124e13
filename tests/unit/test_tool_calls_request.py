"""Tool fields of a request: tools, tool_choice, history calls, tool results,
and the grammar that forces a call."""


import pytest
from jsonschema import Draft202012Validator

from services.adapter.tool_calls.grammar import calls_grammar, calls_schema
from services.adapter.tool_calls.request import (
    check_tool_results,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
)
from services.adapter.tool_calls.types import ToolCall, ToolChoice, Turn
from services.common.errors import Reason, invalid


def _tool(name, parameters=None, **extra):
    function = {"name": name, **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
UNITS = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}},
         "additionalProperties": False}


def test_tools_are_read():
    tools, bad = parse_tools([_tool("weather", CITY, description="d", strict=True),
                              _tool("noargs")])
    assert not bad
    assert [(t.name, t.description, t.strict) for t in tools] == [("weather", "d", True),
                                                                  ("noargs", "", False)]
    assert tools[1].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(("raw", "field", "words"), [
    ([_tool("w", {"type": "strin"})], "tools[0].function.parameters", "not valid JSON Schema"),
    ([_tool("w", {"type": "object", "properties": {"a": {"minLength": -1}}})],
     "tools[0].function.parameters", "not valid JSON Schema"),
    ([_tool("w", {"type": "array"})], "tools[0].function.parameters", "must describe an object"),
    ([_tool("w", [])], "tools[0].function.parameters", "JSON Schema object"),
    ([_tool("bad name!")], "tools[0].function.name", "letters, digits"),
    ([_tool("w"), _tool("w")], "tools[1].function.name", "two tools"),
    ([{"type": "web_search"}], "tools[0].type", "only function tools"),
    ({"a": 1}, "tools", "array"),
])
def test_bad_tools_name_the_field(raw, field, words):
    _, bad = parse_tools(raw)
    assert [v.field for v in bad] == [field]
    assert words in bad[0].description
    error = invalid(bad)
    assert error.reason is Reason.INVALID_ARGUMENT and error.http_status == 400


def test_tool_choice():
    tools, _ = parse_tools([_tool("weather", CITY), _tool("units", UNITS)])
    assert parse_tool_choice(None, tools) == (ToolChoice("auto"), [])
    assert parse_tool_choice(None, ()) == (ToolChoice("none"), [])
    assert parse_tool_choice("required", tools) == (ToolChoice("required"), [])
    named = {"type": "function", "function": {"name": "units"}}
    assert parse_tool_choice(named, tools) == (ToolChoice("named", "units"), [])


@pytest.mark.parametrize(("raw", "field"), [
    ({"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ({"type": "function"}, "tool_choice.function.name"),
    ("always", "tool_choice"),
])
def test_bad_tool_choice(raw, field):
    tools, _ = parse_tools([_tool("weather", CITY)])
    _, bad = parse_tool_choice(raw, tools)
    assert [v.field for v in bad] == [field]


def test_required_without_tools():
    _, bad = parse_tool_choice("required", ())
    assert bad[0].field == "tool_choice"


def test_history_calls_and_results():
    calls, bad = parse_tool_calls([{"id": "call_1", "type": "function", "function": {
        "name": "weather", "arguments": '{"city": "Oslo"}'}}], "messages[1].tool_calls")
    assert not bad and calls == (ToolCall("call_1", "weather", '{"city": "Oslo"}'),)
    turns = [Turn("user", "x"), Turn("assistant", "", calls),
             Turn("tool", "4", tool_call_id="call_1"), Turn("tool", "5", tool_call_id="call_9"),
             Turn("tool", "6")]
    bad = check_tool_results(turns)
    assert [v.field for v in bad] == ["messages[3].tool_call_id", "messages[4].tool_call_id"]
    assert "'call_9' answers no tool call" in bad[0].description


def test_a_result_before_its_call_is_refused():
    turns = [Turn("tool", "4", tool_call_id="c"),
             Turn("assistant", "", (ToolCall("c", "w", "{}"),))]
    assert [v.field for v in check_tool_results(turns)] == ["messages[0].tool_call_id"]


@pytest.mark.parametrize(("raw", "field"), [
    ([{"id": "c", "function": {"name": "w", "arguments": {"a": 1}}}],
     "m.tool_calls[0].function.arguments"),
    ([{"id": "c", "function": {"name": "w", "arguments": "{oops"}}],
     "m.tool_calls[0].function.arguments"),
    ([{"function": {"name": "w", "arguments": "{}"}}], "m.tool_calls[0].id"),
    ("x", "m.tool_calls"),
])
def test_bad_history_calls(raw, field):
    _, bad = parse_tool_calls(raw, "m.tool_calls")
    assert [v.field for v in bad] == [field]


def test_required_grammar_allows_exactly_the_calls():
    tools, _ = parse_tools([_tool("weather", CITY), _tool("units", UNITS)])
    schema = calls_schema(tools, ToolChoice("required"))
    Draft202012Validator.check_schema(schema)
    check = Draft202012Validator(schema)
    assert check.is_valid({"name": "weather", "arguments": {"city": "Oslo"}})
    assert check.is_valid({"name": "units", "arguments": {"unit": "c"}})
    assert not check.is_valid({"name": "weather", "arguments": {}})
    assert not check.is_valid({"name": "units", "arguments": {"unit": "k"}})
    assert not check.is_valid({"name": "other", "arguments": {}})
    assert not check.is_valid({"name": "weather", "arguments": {"city": "x"}, "more": 1})


def test_named_grammar_allows_only_that_tool():
    tools, _ = parse_tools([_tool("weather", CITY), _tool("units", UNITS)])
    schema = calls_schema(tools, ToolChoice("named", "units"))
    check = Draft202012Validator(schema)
    assert check.is_valid({"name": "units", "arguments": {}})
    assert not check.is_valid({"name": "weather", "arguments": {"city": "Oslo"}})


def test_grammar_only_when_forced_and_name_comes_first():
    tools, _ = parse_tools([_tool("weather", CITY)])
    assert calls_grammar(tools, ToolChoice("auto")) is None
    assert calls_grammar(tools, ToolChoice("none")) is None
    grammar = calls_grammar(tools, ToolChoice("required"))
    assert grammar is not None and grammar.kind == "json"
    properties = list(grammar.schema()["properties"])
    assert properties == ["name", "arguments"]
