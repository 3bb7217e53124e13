"""The tool fields of a request, read and checked: `tools`, `tool_choice`,
assistant `tool_calls` in history and `tool` messages.

Every problem is a `FieldViolation` naming the field in OpenAI's spelling
(`tools[1].function.parameters`, `messages[3].tool_call_id`), so the caller
collects them with its other violations and raises one
`services.common.errors.invalid(...)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from services.adapter.tool_calls.types import Tool, ToolCall, ToolChoice, Turn
from services.common.errors import FieldViolation, clip

# OpenAI's rule for function names.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


def parse_tools(raw: Any, field: str = "tools") -> tuple[tuple[Tool, ...], list[FieldViolation]]:
    """`tools` of a chat request: function tools whose `parameters` is valid
    JSON Schema (checked against the schema's own metaschema)."""
    bad: list[FieldViolation] = []
    if raw is None:
        return (), bad
    if not isinstance(raw, list):
        return (), [FieldViolation(field, "must be an array of tools")]
    if len(raw) > MAX_TOOLS:
        return (), [FieldViolation(field, f"at most {MAX_TOOLS} tools, got {len(raw)}")]
    tools: list[Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            bad.append(FieldViolation(f"{where}.type", "only function tools are supported"))
            continue
        function = item.get("function")
        if not isinstance(function, dict):
            bad.append(FieldViolation(f"{where}.function", "must be an object with a `name`"))
            continue
        tool = _function(function, f"{where}.function", bad)
        if tool is None:
            continue
        if tool.name in seen:
            bad.append(FieldViolation(f"{where}.function.name",
                                      f"two tools are named {tool.name!r}"))
            continue
        seen.add(tool.name)
        tools.append(tool)
    return tuple(tools), bad


def _function(function: dict[str, Any], where: str, bad: list[FieldViolation]) -> Tool | None:
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        bad.append(FieldViolation(
            f"{where}.name", "must be 1 to 64 letters, digits, underscores or dashes, got "
            + (repr(clip(name)) if isinstance(name, str) else "no string")))
        return None
    description = function.get("description", "")
    if not isinstance(description, str):
        bad.append(FieldViolation(f"{where}.description", "must be a string"))
        return None
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    problem = schema_problem(parameters)
    if problem:
        bad.append(FieldViolation(f"{where}.parameters", problem))
        return None
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        bad.append(FieldViolation(f"{where}.strict", "must be true or false"))
        return None
    return Tool(name, description, parameters, bool(strict))


# Checking a schema against its metaschema costs about a millisecond; agents
# send the same tools on every turn, so each schema's verdict is kept.
_VERDICTS: dict[str, str] = {}
_MAX_VERDICTS = 4096


def schema_problem(schema: Any) -> str:
    """Why `schema` cannot describe a call's arguments ("" when it can)."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return "must be a JSON Schema object"
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _schema_problem(schema)
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return verdict


def _schema_problem(schema: dict[str, Any]) -> str:
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        return f"is not valid JSON Schema: {clip(exc.message, 200)}" + (f" (at {at})" if at else "")
    kind = schema.get("type")
    if kind is not None and kind != "object":
        return f"must describe an object (arguments are named), got type {clip(repr(kind))}"
    return ""


def parse_tool_choice(raw: Any, tools: Sequence[Tool],
                      field: str = "tool_choice") -> tuple[ToolChoice, list[FieldViolation]]:
    """`tool_choice`: none | auto | required | {"type": "function", "function":
    {"name": ...}}. Absent: `auto` with tools, `none` without (OpenAI's rule)."""
    if raw is None:
        return ToolChoice("auto" if tools else "none"), []
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tools:
            return ToolChoice("none"), [FieldViolation(field, "`required` needs `tools`")]
        return ToolChoice(raw), []
    if isinstance(raw, dict) and raw.get("type") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            return ToolChoice("none"), [FieldViolation(f"{field}.function.name",
                                                       "must name a function")]
        if name not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "none"
            return ToolChoice("none"), [FieldViolation(
                f"{field}.function.name", f"{clip(name)!r} is not in `tools` (tools: {known})")]
        return ToolChoice("named", name), []
    return ToolChoice("none"), [FieldViolation(
        field, 'must be "none", "auto", "required" or {"type": "function", "function": '
        '{"name": ...}}')]


def parse_tool_calls(raw: Any, where: str) -> tuple[tuple[ToolCall, ...], list[FieldViolation]]:
    """The `tool_calls` of an assistant message in the history."""
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        return (), [FieldViolation(where, "must be an array of tool calls")]
    calls: list[ToolCall] = []
    bad: list[FieldViolation] = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            bad.append(FieldViolation(at, "must be {id, type: function, function: {name, "
                                          "arguments}}"))
            continue
        call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        if not isinstance(call_id, str) or not call_id:
            bad.append(FieldViolation(f"{at}.id", "must be a non-empty string"))
        if not isinstance(name, str) or not name:
            bad.append(FieldViolation(f"{at}.function.name", "must be a non-empty string"))
        if not isinstance(arguments, str):
            bad.append(FieldViolation(f"{at}.function.arguments", "must be a string of JSON"))
        elif not _is_json(arguments):
            bad.append(FieldViolation(f"{at}.function.arguments", "is not valid JSON"))
        if isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str):
            calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls), bad


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check_tool_results(turns: Sequence[Turn], field: str = "messages") -> list[FieldViolation]:
    """Every `tool` message answers a call made earlier in the conversation."""
    bad: list[FieldViolation] = []
    made: set[str] = set()
    for i, turn in enumerate(turns):
        made.update(call.id for call in turn.tool_calls)
        if turn.role != "tool":
            continue
        if not turn.tool_call_id:
            bad.append(FieldViolation(f"{field}[{i}].tool_call_id",
                                      "is required on a tool message"))
        elif turn.tool_call_id not in made:
            bad.append(FieldViolation(
                f"{field}[{i}].tool_call_id",
                f"{clip(turn.tool_call_id)!r} answers no tool call of an earlier assistant "
                "message"))
    return bad
