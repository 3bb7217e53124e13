"""A model's output -> content and tool calls, whole or streamed.

One incremental parser serves both: the whole text is the stream fed at once,
so a streamed answer always adds up to the unstreamed one. It emits `Delta`s
in OpenAI's streamed shape: content fragments, and per call a first delta with
`index`, `id`, `type` and `function.name`, then `function.arguments` as string
fragments. It holds back only text that could still begin call markup, so
markup never reaches `content`.

Modes:
- markup (`auto`): Hermes `<tool_call>...</tool_call>` (Qwen2 and generic), or
  Llama 3.1's bare JSON call (optionally after `<|python_tag|>`), which is the
  whole message when present. A call is held until it is complete, then
  checked: a call that is not JSON, names no offered tool, or has no object
  of arguments goes out as content and is counted (`on_malformed`), never
  raised.
- forced (`required` / named, under the grammar of `grammar.calls_schema`):
  the whole output is one JSON call; its arguments stream as the engine
  writes them.

`arguments` is the argument object's text exactly as the model wrote it.
Whitespace-only content (the newlines around calls) is sent only when more
content follows it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.adapter.tool_calls.render import Family
from services.adapter.tool_calls.types import (
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    new_call_id,
)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


@dataclass(frozen=True)
class Delta:
    """What one step of the stream adds: content, or call pieces."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Parsed:
    """A whole answer: content (None when there is none) and the calls."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    malformed: int = 0

    @property
    def finish_reason(self) -> str | None:
        """`tool_calls` when there are calls; None: keep the engine's reason."""
        return "tool_calls" if self.tool_calls else None


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class StreamParser:
    """Feed text as the engine produces it; read deltas back."""

    family: Family
    tools: Sequence[Tool]
    choice: ToolChoice = field(default_factory=ToolChoice)
    on_malformed: Callable[[str], None] | None = None
    new_id: Callable[[], str] = new_call_id
    # `parallel_tool_calls: false`: calls after the first are dropped.
    parallel: bool = True

    def __post_init__(self) -> None:
        self._names = {t.name for t in self.tools}
        self._buf = ""
        self._pending_ws = ""
        self._calls: list[_Call] = []
        self._in_call = False  # hermes: inside <tool_call>
        self._llama: str | None = None  # llama: None undecided, "text" or "call"
        self._args_from = -1  # forced: where the arguments start in _buf
        self.malformed = 0
        self._done = False

    @property
    def forced(self) -> bool:
        return self.choice.forced

    @property
    def active(self) -> bool:
        """Whether output is parsed at all (`tool_choice: none` passes it)."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(c.id, c.name, c.arguments) for c in self._calls)

    def feed(self, text: str) -> list[Delta]:
        if not self.active:
            return [Delta(content=text)] if text else []
        self._buf += text
        return self._step(final=False)

    def finish(self) -> list[Delta]:
        """The end of the output: whatever was held back is settled."""
        if not self.active or self._done:
            return []
        self._done = True
        return self._step(final=True)

    def _step(self, final: bool) -> list[Delta]:
        """What the held text settles, read by the output's form."""
        out: list[Delta] = []
        if self.forced:
            self._forced_step(out, final=final)
        elif self.family is Family.LLAMA3_JSON:
            self._llama_step(out, final=final)
        else:
            self._hermes_step(out, final=final)
        return out

    # -- content and calls out -------------------------------------------
    def _content(self, out: list[Delta], text: str) -> None:
        if not text:
            return
        text = self._pending_ws + text
        body = text.rstrip(_WS)
        if not body:
            self._pending_ws = text
            return
        # Trailing whitespace waits: it is sent only if more content follows.
        self._pending_ws = text[len(body):]
        out.append(Delta(content=body))

    def _malformed(self, out: list[Delta], text: str, why: str) -> None:
        self.malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(why)
        self._content(out, text)

    def _call(self, out: list[Delta], name: str, arguments: str) -> None:
        if self._calls and not self.parallel:
            return
        call = _Call(len(self._calls), self.new_id(), name, arguments)
        self._calls.append(call)
        out.append(Delta(tool_calls=(ToolCallDelta(call.index, "", call.id, name),)))
        if arguments:
            out.append(Delta(tool_calls=(ToolCallDelta(call.index, arguments),)))

    def _settle(self, out: list[Delta], text: str, body: str) -> None:
        """A complete call's text: calls if it holds valid ones, else content."""
        calls, why = read_calls(body, self._names)
        if calls is None:
            self._malformed(out, text, why)
            return
        for name, arguments in calls:
            self._call(out, name, arguments)

    # -- Hermes: <tool_call>{...}</tool_call> ----------------------------
    def _hermes_step(self, out: list[Delta], *, final: bool) -> None:
        while True:
            if self._in_call:
                end = self._buf.find(HERMES_CLOSE)
                if end < 0:
                    if final:  # a model may stop before the closing tag
                        body, self._buf = self._buf, ""
                        self._in_call = False
                        self._settle(out, HERMES_OPEN + body, body)
                    return
                body = self._buf[:end]
                self._buf = self._buf[end + len(HERMES_CLOSE):]
                self._in_call = False
                self._settle(out, HERMES_OPEN + body + HERMES_CLOSE, body)
                continue
            start = self._buf.find(HERMES_OPEN)
            if start >= 0:
                self._content(out, self._buf[:start])
                self._buf = self._buf[start + len(HERMES_OPEN):]
                self._in_call = True
                continue
            keep = 0 if final else partial_suffix(self._buf, (HERMES_OPEN,))
            self._content(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return

    # -- Llama 3.1: the whole message is {"name": ..., "parameters": ...} --
    def _llama_step(self, out: list[Delta], *, final: bool) -> None:
        if self._llama is None:
            head = self._buf.lstrip(_WS)
            if head.startswith(PYTHON_TAG) or head.startswith("{"):
                self._llama = "call"
            elif head and not PYTHON_TAG.startswith(head):
                self._llama = "text"
            elif not final:
                return
        if self._llama == "call":
            if not final:
                return
            text, self._buf = self._buf, ""
            body = text.lstrip(_WS).removeprefix(PYTHON_TAG)
            calls, why = read_calls(body, self._names, separator=";")
            if calls is not None:
                for name, arguments in calls:
                    self._call(out, name, arguments)
            elif text.lstrip(_WS).startswith(PYTHON_TAG) or '"name"' in body:
                self._malformed(out, text, why)
            else:  # JSON the user asked for, not a call
                self._content(out, text)
            return
        text, self._buf = self._buf, ""
        self._content(out, text)

    # -- forced: the output is one JSON call --------------------------------
    def _forced_step(self, out: list[Delta], *, final: bool) -> None:
        if self._args_from < 0:
            match = _CALL_HEAD.match(self._buf)
            if match and match.group(1) in self._names:
                self._args_from = match.end()
                self._call(out, match.group(1), "")
        if self._args_from >= 0 and not final:
            # Stream the arguments, holding back what could close the call.
            call = self._calls[-1]
            text = self._buf[self._args_from:]
            if not call.arguments:  # the value starts after any whitespace
                lead = len(text) - len(text.lstrip(_WS))
                self._args_from += lead
                text = text[lead:]
            upto = len(text.rstrip("}" + _WS))
            if upto > len(call.arguments):
                piece = text[len(call.arguments):upto]
                call.arguments += piece
                out.append(Delta(tool_calls=(ToolCallDelta(call.index, piece),)))
            return
        if not final:
            return
        if self._args_from < 0:
            self._settle(out, self._buf, self._buf)
            return
        call = self._calls[-1]
        calls, why = read_calls(self._buf, self._names)
        rest = calls[0][1] if calls and len(calls) == 1 else None
        if rest is None or not rest.startswith(call.arguments):
            # Cut short (by a token limit): the call keeps what was sent.
            self.malformed += 1
            if self.on_malformed is not None:
                self.on_malformed(why or "forced call does not close")
            return
        piece = rest[len(call.arguments):]
        call.arguments = rest
        if piece:
            out.append(Delta(tool_calls=(ToolCallDelta(call.index, piece),)))


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """The length of the longest end of `text` that begins one of `markers`
    (and is not a whole marker): what must wait for more text."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def read_calls(body: str, names: set[str], separator: str = ""
               ) -> tuple[list[tuple[str, str]] | None, str]:
    """The calls in a call's text: one JSON object, an array of them, or (with
    `separator`) several objects separated by it. Each call is (name, its
    arguments' JSON text as written). None and why when it is not that."""
    items = _json_values(body.strip(), separator)
    if items is None:
        return None, "call is not JSON"
    calls: list[tuple[str, str]] = []
    for text in items:
        if text.startswith("["):
            inner = _array_items(text)
            if inner is None:
                return None, "call is not JSON"
            nested: list[str] = inner
        else:
            nested = [text]
        for item in nested:
            call = _one_call(item, names)
            if isinstance(call, str):
                return None, call
            calls.append(call)
    if not calls:
        return None, "no call in the call markup"
    return calls, ""


_DECODER = json.JSONDecoder()


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _json_values(text: str, separator: str) -> list[str] | None:
    """The raw texts of the JSON values in `text` (one, or several joined by
    `separator`)."""
    out: list[str] = []
    pos = 0
    while True:
        pos = _skip(text, pos)
        try:
            _, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(text[pos:end])
        pos = _skip(text, end)
        if pos == len(text):
            return out
        if not separator or not text.startswith(separator, pos):
            return None
        pos += len(separator)


def _array_items(text: str) -> list[str] | None:
    pos = _skip(text, 1)
    out: list[str] = []
    if text[pos:pos + 1] == "]":
        return out
    while True:
        try:
            _, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(text[pos:end])
        pos = _skip(text, end)
        if text[pos:pos + 1] == "]":
            return out
        if text[pos:pos + 1] != ",":
            return None
        pos = _skip(text, pos + 1)


def _members(text: str) -> list[tuple[str, Any, str]] | None:
    """The members of a JSON object's text: (key, value, the value's raw text)."""
    if not text.startswith("{"):
        return None
    out: list[tuple[str, Any, str]] = []
    pos = _skip(text, 1)
    if text[pos:pos + 1] == "}":
        return out
    while True:
        try:
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            if not isinstance(key, str) or text[pos:pos + 1] != ":":
                return None
            start = _skip(text, pos + 1)
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            return None
        out.append((key, value, text[start:end]))
        pos = _skip(text, end)
        if text[pos:pos + 1] == "}":
            return out
        if text[pos:pos + 1] != ",":
            return None
        pos = _skip(text, pos + 1)


def _one_call(text: str, names: set[str]) -> tuple[str, str] | str:
    members = _members(text)
    if members is None:
        return "call is not a JSON object"
    fields = {k: (v, raw) for k, v, raw in members}
    name = fields.get("name", (None, ""))[0]
    if not isinstance(name, str) or name not in names:
        return "call names no offered tool"
    for key in ARGUMENT_KEYS:
        if key in fields:
            value, raw = fields[key]
            if isinstance(value, str):  # arguments sent as a string of JSON
                try:
                    decoded = json.loads(value)
                except ValueError:
                    return "call arguments are not JSON"
                value, raw = decoded, value
            if not isinstance(value, dict):
                return "call arguments are not an object"
            return name, raw
    return name, "{}"


def parse(family: Family, text: str, tools: Sequence[Tool],
          choice: ToolChoice | None = None, *,
          on_malformed: Callable[[str], None] | None = None,
          new_id: Callable[[], str] = new_call_id, parallel: bool = True) -> Parsed:
    """A whole output: content and calls (the stream parser fed at once)."""
    parser = StreamParser(family, tools, choice or ToolChoice(), on_malformed, new_id,
                          parallel)
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.content for d in deltas)
    return Parsed(content or None, parser.tool_calls, parser.malformed)
