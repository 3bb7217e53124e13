"""Tool calling through an engine's own chat API (`chat_api: engine`).

The request side: the tools, the tool choice and the conversation (assistant
`tool_calls`, `tool` results) in OpenAI's shape, as an OpenAI-compatible
server's /v1/chat/completions takes them. The answer side: `CallAssembler`
turns what the engine sends back (`message.tool_calls`, or streamed
`delta.tool_calls`) into the mesh's calls, whatever the engine's habits:

- ids are the mesh's own (`call_` + 24 hex), one per call, whatever id the
  engine sent or left out;
- `arguments` is always JSON text (an engine that sends an object, as
  TGI's OpenAI route does, has it dumped);
- id, name and type go out once per call, in its first delta, even when the
  engine repeats the name in every delta (llama-cpp-python's server does);
- argument fragments are joined per call `index`, so interleaved parallel
  calls stay apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.adapter.tool_calls.types import (
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Turn,
    new_call_id,
)


@dataclass(frozen=True)
class EngineTools:
    """A conversation with tools for an engine that applies its own template."""

    turns: tuple[Turn, ...]
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool = True

    def messages(self) -> list[dict[str, Any]]:
        """The conversation in OpenAI's chat shape."""
        out: list[dict[str, Any]] = []
        for turn in self.turns:
            message: dict[str, Any] = {"role": turn.role, "content": turn.content}
            if turn.tool_calls:
                message["tool_calls"] = [call.openai() for call in turn.tool_calls]
                if not turn.content:
                    message["content"] = None
            if turn.role == "tool":
                message["tool_call_id"] = turn.tool_call_id
            out.append(message)
        return out

    def fields(self, send_choice: bool = True) -> dict[str, Any]:
        """`tools`, `tool_choice` and `parallel_tool_calls` for the request.

        With the choice `none` no tools are offered at all (the history may
        still hold calls). `send_choice` False leaves `tool_choice` out, for
        an engine that takes tools but not the field (its default is auto).
        """
        if self.choice.mode == "none" or not self.tools:
            return {}
        fields: dict[str, Any] = {"tools": [tool.openai() for tool in self.tools]}
        if send_choice:
            if self.choice.mode == "named":
                fields["tool_choice"] = {"type": "function",
                                         "function": {"name": self.choice.name}}
            else:
                fields["tool_choice"] = self.choice.mode
        if not self.parallel:
            fields["parallel_tool_calls"] = False
        return fields


def _arguments(value: Any) -> str:
    """Arguments as JSON text: a string as sent, anything else dumped."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


@dataclass
class _Call:
    id: str
    name: str = ""
    arguments: str = ""
    announced: bool = False  # whether its id and name went out


class CallAssembler:
    """The engine's tool calls as the mesh's: feed each streamed
    `delta.tool_calls` list to `feed`, or a whole `message` to `message`;
    `calls` holds every call so far."""

    def __init__(self) -> None:
        self._calls: dict[int, _Call] = {}  # by the engine's index
        self._order: list[int] = []

    def feed(self, items: Iterable[Any]) -> tuple[ToolCallDelta, ...]:
        """One chunk's `delta.tool_calls`: the mesh's deltas for it."""
        out: list[ToolCallDelta] = []
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            function = item.get("function")
            function = function if isinstance(function, dict) else {}
            index = item.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                # No index: a call of its own unless it carries no name (a
                # fragment of the last call).
                index = (self._order[-1] if self._order and not function.get("name")
                         else len(self._order) + position)
            call = self._calls.get(index)
            if call is None:
                call = self._calls[index] = _Call(new_call_id())
                self._order.append(index)
            name = function.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name
            fragment = _arguments(function.get("arguments"))
            call.arguments += fragment
            mesh_index = self._order.index(index)
            if not call.announced:
                if not call.name:
                    continue  # held until its name arrives
                call.announced = True
                out.append(ToolCallDelta(mesh_index, call.arguments, call.id, call.name))
            elif fragment:
                out.append(ToolCallDelta(mesh_index, fragment))
        return tuple(out)

    def message(self, message: Any) -> tuple[ToolCall, ...]:
        """A whole `message` (non-streamed): its calls."""
        items = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(items, list):
            # Each item is a whole call: indexes by position when missing.
            self.feed({**item, "index": i} if isinstance(item, dict) else item
                      for i, item in enumerate(items))
        return self.calls

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(c.id, c.name, c.arguments or "{}")
                     for c in (self._calls[i] for i in self._order) if c.name)
