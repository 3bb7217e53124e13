"""Domain types of tool calling: tools, a tool choice, calls and the turns of
a conversation that carries them."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

ChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is its JSON Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False

    def openai(self) -> dict[str, Any]:
        """The tool as a chat template sees it (OpenAI's request shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """`none`, `auto`, `required`, or one named function (`named`)."""

    mode: ChoiceMode = "auto"
    name: str = ""

    @property
    def forced(self) -> bool:
        """Whether the output must be a call (enforced with a grammar)."""
        return self.mode in ("required", "named")


@dataclass(frozen=True)
class ToolCall:
    """One call: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def arguments_value(self) -> Any:
        """The arguments decoded (a template renders them as an object)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one call: the first has `id` and `name`, later ones arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        """As an item of `choices[].delta.tool_calls` in a chunk."""
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
            function = {"name": self.name, "arguments": self.arguments}
        out["function"] = function
        return out


@dataclass(frozen=True)
class Turn:
    """One message of a conversation with tools.

    Roles: system, user, assistant (optionally with `tool_calls`), tool (the
    result of the call `tool_call_id`).
    """

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


def new_call_id() -> str:
    """A call id unique across requests and replicas: `call_` + 24 hex digits."""
    return "call_" + secrets.token_hex(12)
