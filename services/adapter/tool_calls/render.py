"""Tools and tool turns rendered into a model's prompt, per model family.

- `hermes` (Qwen2): the format of Qwen's official chat template with `tools`
  (Qwen2.5-Instruct's `tokenizer_config.json`; Qwen2-7B-Instruct's own
  template takes no tools, and Qwen documents the Hermes style for both):
  the tools as JSON lines in `<tools></tools>` in the system prompt, calls as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the
  assistant's turn, results as `<tool_response>` blocks in one user turn.
  Rendered as plain messages through the model's own ChatML template.
- `llama3_json` (Llama 3.1): Meta's official Llama 3.1 Instruct template with
  custom tools (`tools_in_user_message`, its default): `Environment: ipython`
  in the system header, the tools as indented JSON at the head of the first
  user message, calls as `{"name": ..., "parameters": {...}}`, results in an
  `ipython` turn. Llama 3.1's template renders one call per assistant turn
  and refuses more; here each call of a parallel turn gets its own turn.
- `generic` (SmolLM2 and any other model): the Hermes markup over the model's
  own template, with no default system prompt. SmolLM2-Instruct was trained
  on function-calling data with `<tools>` and `<tool_call>` tags; the grammar
  of `required` and named choices makes the output a call whatever the model
  learnt.

`tojson` as Hugging Face's chat templates define it: `json.dumps` with
`ensure_ascii=False`, keys in their given order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from services.adapter.tool_calls.types import Tool, ToolCall, Turn
from services.common.errors import FieldViolation, invalid
from services.common.types import Message


class Family(StrEnum):
    """How a model family writes tools, calls and results."""

    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    GENERIC = "generic"


def family_of(template_source: str) -> Family:
    """The family of a chat template, from the markup it uses."""
    if "<|start_header_id|>" in template_source:
        return Family.LLAMA3_JSON
    if "<|im_start|>" in template_source and "You are a helpful assistant." in template_source:
        return Family.HERMES  # Qwen2's ChatML with its default system prompt
    return Family.GENERIC


# Qwen's official wording (Qwen2.5-Instruct's chat template).
HERMES_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
# Qwen2-7B-Instruct's default system prompt.
QWEN2_SYSTEM = "You are a helpful assistant."

# Meta's official wording (Llama 3.1 Instruct's chat template).
LLAMA3_TOOLS_HEAD = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument '
    'name and its value}. Do not use variables.\n\n'
)
LLAMA3_DATE = "26 Jul 2024"

Template = Callable[[Sequence[Message]], str]


def tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def render(family: Family, turns: Sequence[Turn], tools: Sequence[Tool], template: Template,
           *, bos_token: str = "", date_string: str = LLAMA3_DATE) -> str:
    """The prompt for `turns` offering `tools` (none: tools are not mentioned,
    though earlier calls and results in the history still render)."""
    if family is Family.LLAMA3_JSON:
        return render_llama3(turns, tools, bos_token=bos_token, date_string=date_string)
    system = QWEN2_SYSTEM if family is Family.HERMES else ""
    return template(hermes_messages(turns, tools, default_system=system))


def hermes_tools_block(tools: Sequence[Tool]) -> str:
    lines = "".join("\n" + tojson(t.openai()) for t in tools)
    return HERMES_TOOLS_HEAD + lines + HERMES_TOOLS_TAIL


def hermes_call(call: ToolCall) -> str:
    return ('<tool_call>\n{"name": "' + call.name + '", "arguments": '
            + tojson(call.arguments_value()) + "}\n</tool_call>")


def hermes_messages(turns: Sequence[Turn], tools: Sequence[Tool],
                    default_system: str = "") -> list[Message]:
    """Turns with tools as plain role/content messages in the Hermes markup,
    for any chat template to render."""
    out: list[Message] = []
    rest = list(turns)
    if tools:
        system = rest.pop(0).content if rest and rest[0].role == "system" else default_system
        out.append(Message("system", (system + "\n\n" if system else "")
                           + hermes_tools_block(tools)))
    results: list[str] = []
    for turn in rest:
        if turn.role == "tool":
            results.append("<tool_response>\n" + turn.content + "\n</tool_response>")
            continue
        if results:
            out.append(Message("user", "\n".join(results)))
            results = []
        if turn.role == "assistant" and turn.tool_calls:
            parts = [turn.content] if turn.content else []
            parts += [hermes_call(c) for c in turn.tool_calls]
            out.append(Message("assistant", "\n".join(parts)))
        else:
            out.append(Message(turn.role, turn.content))
    if results:
        out.append(Message("user", "\n".join(results)))
    return out


def _header(role: str) -> str:
    return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"


def render_llama3(turns: Sequence[Turn], tools: Sequence[Tool], *, bos_token: str = "",
                  date_string: str = LLAMA3_DATE) -> str:
    rest = list(turns)
    system = rest.pop(0).content.strip() if rest and rest[0].role == "system" else ""
    out = [bos_token, _header("system")]
    if tools:
        out.append("Environment: ipython\n")
    out += ["Cutting Knowledge Date: December 2023\n", f"Today Date: {date_string}\n\n",
            system, "<|eot_id|>"]
    if tools:
        if not rest:
            raise invalid([FieldViolation(
                "messages", "tools go in the first user message, and there is none")])
        first = rest.pop(0)
        out.append(_header("user") + LLAMA3_TOOLS_HEAD)
        out += [tojson(t.openai(), indent=4) + "\n\n" for t in tools]
        out.append(first.content.strip() + "<|eot_id|>")
    for turn in rest:
        if turn.role == "assistant" and turn.tool_calls:
            for call in turn.tool_calls:
                out.append(_header("assistant") + '{"name": "' + call.name + '", '
                           + '"parameters": ' + tojson(call.arguments_value()) + "}<|eot_id|>")
        elif turn.role in ("tool", "ipython"):
            # The official template passes a string result through tojson too.
            out.append(_header("ipython") + tojson(turn.content) + "<|eot_id|>")
        else:
            out.append(_header(turn.role) + turn.content.strip() + "<|eot_id|>")
    out.append(_header("assistant"))
    return "".join(out)
