"""The grammar that makes a model call a tool (`tool_choice` `required` or
named): a JSON Schema of the allowed calls, for the engine's structured
output (TGI's `grammar`, vLLM's `guided_json`, the CPU backend's grammar).

The output is one JSON object `{"name": <a tool's name>, "arguments": <an
object valid against that tool's parameters>}`, `name` first so that the
call's name is known before its arguments stream. `parse.StreamParser` in
forced mode reads it back into one tool call (the engine's finish reason is
then replaced by `tool_calls`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.adapter.tool_calls.types import Tool, ToolChoice
from services.common.types import Grammar


def call_schema(tool: Tool) -> dict[str, Any]:
    """The schema of a call of one tool."""
    parameters = tool.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_schema(tools: Sequence[Tool], choice: ToolChoice) -> dict[str, Any] | None:
    """The schema the output must match, or None when the choice forces nothing."""
    if not choice.forced:
        return None
    allowed = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    if not allowed:
        raise ValueError(f"tool choice {choice} allows no tool")
    if len(allowed) == 1:
        return call_schema(allowed[0])
    return {"anyOf": [call_schema(t) for t in allowed]}


def calls_grammar(tools: Sequence[Tool], choice: ToolChoice) -> Grammar | None:
    """`calls_schema` as the mesh's grammar parameter. The schema's keys keep
    their order (`name` before `arguments`) on their way to the engine."""
    schema = calls_schema(tools, choice)
    if schema is None:
        return None
    return Grammar.json_schema(schema)
