"""OpenAI's Responses API (`POST /v1/responses`), stateless, over chat completions.

Three translations, none of which touches a transport:
- `translate_request`: a Responses body -> a chat completions body (the one
  `POST /v1/chat/completions` takes), and what the reply must echo;
- `build_response`: a chat completion -> a `Response` object;
- `ResponseEvents`: chat completion chunks -> the Responses API's typed
  stream events (`response.created` ... `response.completed`), numbered by
  `sequence_number`, each sent as `event: <type>` + `data: <json>`.

The mesh keeps no state: `previous_response_id`, `conversation` and
`store: true` are refused with a 400 that says so. An absent `store` is taken
as false: OpenAI's default is true, but clients that need no storage leave it
out (the OpenAI Agents SDK sends `store` only when its settings set it), and
refusing them would refuse the mesh's main Responses client.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FieldViolation, MeshError, clip, invalid

STATELESS = ("the mesh keeps no state between requests: send the whole conversation in "
             "`input` (and `store: false`)")

# Accepted and left aside: they cannot change the generated text.
IGNORED = frozenset({
    "user", "metadata", "include", "truncation", "service_tier", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "stream_options",
    "moderation",
})
# Accepted only with a value that asks for nothing.
NEUTRAL = frozenset({"background", "reasoning", "top_logprobs", "max_tool_calls", "prompt",
                     "context_management", "image", "access_programs"})
KNOWN = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text",
    "tools", "tool_choice", "parallel_tool_calls", "stream", "store", "previous_response_id",
    "conversation",
}) | IGNORED | NEUTRAL
ROLES = frozenset({"user", "system", "developer", "assistant"})
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class ResponsesRequest:
    """A translated request: the chat completions body, and the fields the
    `Response` object echoes back."""

    chat: dict[str, Any]
    echo: dict[str, Any]
    stream: bool = False


def translate_request(body: Any) -> ResponsesRequest:
    """A `POST /v1/responses` body -> a chat completions body. Raises one
    INVALID_ARGUMENT MeshError naming every field at fault, in the Responses
    API's spelling (`input[2].call_id`)."""
    if not isinstance(body, dict):
        raise invalid([FieldViolation("body", "must be a JSON object")])
    bad: list[FieldViolation] = []
    for name, value in body.items():
        if name not in KNOWN:
            bad.append(FieldViolation(name, "unrecognized request argument"))
        elif name in NEUTRAL and value not in (None, False, 0, {}, [], ""):
            bad.append(FieldViolation(name, "not supported by this server"))
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            bad.append(FieldViolation(name, STATELESS))
    if body.get("store") is True:
        bad.append(FieldViolation("store", STATELESS))
    elif body.get("store") not in (None, False):
        bad.append(FieldViolation("store", "must be true or false"))

    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if isinstance(instructions, str):
            if instructions:
                messages.append({"role": "system", "content": instructions})
        else:
            bad.append(FieldViolation("instructions", "must be a string"))
    messages += _input(body.get("input"), bad)

    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _tools(body.get("tools"), bad)
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"), bad)
    if choice is not None:
        chat["tool_choice"] = choice
    text_format = _text_format(body.get("text"), bad)
    if text_format is not None:
        chat["response_format"] = text_format
    stream = body.get("stream") is True
    if body.get("stream") not in (None, True, False):
        bad.append(FieldViolation("stream", "must be true or false"))
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if bad:
        raise invalid(bad)
    return ResponsesRequest(chat=chat, echo=_echo(body), stream=stream)


# The chat request's fields as the Responses API names them (errors found
# once the translated body is read as a chat request).
_RESPONSES_NAMES = (
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    ("messages", "input"),
)


def responses_field(field: str) -> str:
    """A chat request's field in the Responses API's spelling (`tools[i].function.x`
    is `tools[i].x`; a message index is left as it is)."""
    for chat, name in _RESPONSES_NAMES:
        if field == chat or field.startswith((chat + ".", chat + "[")):
            return name + field[len(chat):]
    if field.startswith("tools[") and ".function." in field:
        return field.replace(".function.", ".", 1)
    return field


def in_responses_terms(error: MeshError) -> MeshError:
    """A chat request's field violations, named as the Responses API names them."""
    if not error.violations:
        return error
    return invalid([FieldViolation(responses_field(v.field), v.description)
                    for v in error.violations])


def _text(content: Any, where: str, bad: list[FieldViolation]) -> str | None:
    """A message's content: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                kind = part.get("type") if isinstance(part, dict) else None
                bad.append(FieldViolation(f"{where}[{j}].type",
                                          f"only text parts are supported, got {clip(str(kind))}"))
            elif not isinstance(part.get("text"), str):
                bad.append(FieldViolation(f"{where}[{j}].text", "must be a string"))
            else:
                texts.append(part["text"])
        return "\n".join(texts)
    bad.append(FieldViolation(where, "must be a string or an array of text parts"))
    return None


def _input(raw: Any, bad: list[FieldViolation]) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        bad.append(FieldViolation("input", "must be a string or a non-empty array of items"))
        return []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            bad.append(FieldViolation(where, "must be an object"))
            continue
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                bad.append(FieldViolation(f"{where}.role",
                                          f"must be one of {', '.join(sorted(ROLES))}"))
                continue
            content = _text(item.get("content"), f"{where}.content", bad)
            if content is not None:
                out.append({"role": "system" if role == "developer" else role,
                            "content": content})
        elif kind == "function_call":
            call = _function_call(item, where, bad)
            if call is None:
                continue
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                bad.append(FieldViolation(f"{where}.call_id", "must be a non-empty string"))
                continue
            output = _text(item.get("output"), f"{where}.output", bad)
            if output is not None:
                out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # the model's own notes from an earlier turn: no text to render
        else:
            bad.append(FieldViolation(
                f"{where}.type", "must be message, function_call or function_call_output, got "
                + clip(str(kind)) + (" (" + STATELESS + ")" if kind == "item_reference" else "")))
    return out


def _function_call(item: Mapping[str, Any], where: str,
                   bad: list[FieldViolation]) -> dict[str, Any] | None:
    values = {k: item.get(k) for k in ("call_id", "name", "arguments")}
    ok = True
    for key, value in values.items():
        if not isinstance(value, str) or (key != "arguments" and not value):
            bad.append(FieldViolation(f"{where}.{key}", "must be a non-empty string"
                                      if key != "arguments" else "must be a string of JSON"))
            ok = False
    if not ok:
        return None
    return {"id": values["call_id"], "type": "function",
            "function": {"name": values["name"], "arguments": values["arguments"]}}


def _tools(raw: Any, bad: list[FieldViolation]) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        bad.append(FieldViolation("tools", "must be an array of tools"))
        return []
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            bad.append(FieldViolation(f"tools[{i}].type",
                                      f"only function tools are supported, got {clip(str(kind))}"))
            continue
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(raw: Any, bad: list[FieldViolation]) -> Any:
    if raw is None or raw in ("none", "auto", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(
            raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    bad.append(FieldViolation("tool_choice", 'must be "none", "auto", "required" or '
                                             '{"type": "function", "name": ...}'))
    return None


def _text_format(raw: Any, bad: list[FieldViolation]) -> dict[str, Any] | None:
    if raw is None:
        return None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt is None:
        if not isinstance(raw, dict):
            bad.append(FieldViolation("text", "must be an object"))
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    bad.append(FieldViolation("text.format.type",
                              f"must be text, json_object or json_schema, got {clip(str(kind))}"))
    return None


def _echo(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's own fields as a Response object repeats them."""
    tools = [dict({"strict": True, "parameters": None, "description": None}, **t)
             for t in body.get("tools") or []]
    text = body.get("text") if isinstance(body.get("text"), dict) else None
    return {
        "model": body.get("model"),
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "tools": tools,
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "text": text or {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {},
        "store": False,
        "previous_response_id": None,
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
        "background": False,
    }


def _usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)] if status != "in_progress" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _response(request: ResponsesRequest, response_id: str, created_at: int, model: str,
              output: list[dict[str, Any]], status: str,
              usage: dict[str, Any] | None) -> dict[str, Any]:
    incomplete = status == "incomplete"
    return dict(
        request.echo,
        id=response_id, object="response", created_at=created_at, model=model,
        status=status, output=output, usage=usage, error=None,
        incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
        completed_at=int(time.time()) if status in ("completed", "incomplete") else None,
    )


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def build_response(completion: Mapping[str, Any], request: ResponsesRequest, *,
                   response_id: str | None = None,
                   created_at: int | None = None) -> dict[str, Any]:
    """A chat completion (OpenAI's shape) -> a Response object."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(new_id("msg"), message["content"], "completed"))
    for call in message.get("tool_calls") or []:
        function = call["function"]
        output.append(_call_item(new_id("fc"), call["id"], function["name"],
                                 function["arguments"], "completed"))
    finish = choice.get("finish_reason")
    return _response(request, response_id or new_id("resp"),
                     created_at if created_at is not None else int(completion.get(
                         "created", time.time())),
                     str(completion.get("model") or request.echo["model"]), output,
                     _status(finish), _usage(completion.get("usage")))


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One event as the Responses API streams it."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


@dataclass
class _Item:
    index: int
    id: str
    kind: str  # "message" or "function_call"
    text: str = ""
    call_id: str = ""
    name: str = ""


@dataclass
class ResponseEvents:
    """Chat completion chunks in, Responses API events out."""

    request: ResponsesRequest
    model: str
    response_id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool_call index -> item
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self, status: str) -> dict[str, Any]:
        output = [self._item_body(i, "completed") for i in self._items] if status != (
            "in_progress") else []
        return _response(self.request, self.response_id, self.created_at, self.model, output,
                         status, self._usage if status != "in_progress" else None)

    @staticmethod
    def _item_body(item: _Item, status: str) -> dict[str, Any]:
        if item.kind == "message":
            return _message_item(item.id, item.text, status)
        return _call_item(item.id, item.call_id, item.name, item.text, status)

    def start(self) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`."""
        return [self._event("response.created", response=self._snapshot("in_progress")),
                self._event("response.in_progress", response=self._snapshot("in_progress"))]

    def chunk(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The events one chat completion chunk makes."""
        out: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _text(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._open is None or self._open.kind != "message":
            out += self._close()
            item = _Item(len(self._items), new_id("msg"), "message")
            self._items.append(item)
            self._open = item
            out.append(self._event("response.output_item.added", output_index=item.index,
                                   item=self._item_body(item, "in_progress")))
            out.append(self._event("response.content_part.added", item_id=item.id,
                                   output_index=item.index, content_index=0,
                                   part=_text_part("")))
        item = self._open
        item.text += text
        out.append(self._event("response.output_text.delta", item_id=item.id,
                               output_index=item.index, content_index=0, delta=text,
                               logprobs=[]))
        return out

    def _call(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        function = call.get("function") or {}
        index = call.get("index", 0)
        item = self._calls.get(index)
        if item is None:
            out += self._close()
            item = _Item(len(self._items), new_id("fc"), "function_call",
                         call_id=call.get("id") or new_id("call"),
                         name=function.get("name") or "")
            self._items.append(item)
            self._calls[index] = item
            self._open = item
            out.append(self._event("response.output_item.added", output_index=item.index,
                                   item=self._item_body(item, "in_progress")))
        piece = function.get("arguments") or ""
        if piece:
            item.text += piece
            out.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                   output_index=item.index, delta=piece))
        return out

    def _close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        if item.kind == "message":
            return [
                self._event("response.output_text.done", item_id=item.id,
                            output_index=item.index, content_index=0, text=item.text,
                            logprobs=[]),
                self._event("response.content_part.done", item_id=item.id,
                            output_index=item.index, content_index=0,
                            part=_text_part(item.text)),
                self._event("response.output_item.done", output_index=item.index,
                            item=self._item_body(item, "completed")),
            ]
        return [
            self._event("response.function_call_arguments.done", item_id=item.id,
                        output_index=item.index, arguments=item.text, name=item.name),
            self._event("response.output_item.done", output_index=item.index,
                        item=self._item_body(item, "completed")),
        ]

    def finish(self) -> list[dict[str, Any]]:
        """Close the open item, then `response.completed` (or `.incomplete`
        when the token limit cut the answer)."""
        out = self._close()
        status = _status(self._finish)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._event(kind, response=self._snapshot(status)))
        return out

    def error(self, error: MeshError) -> list[dict[str, Any]]:
        """A failure after the stream started: an `error` event."""
        return [self._event("error", code=error.reason.label, message=error.message,
                            param=None)]
