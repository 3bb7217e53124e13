"""OpenAI request bodies -> the mesh's `GenerationRequest`.

Every field of OpenAI's chat and (legacy) completions requests is honoured,
ignored because it cannot change the text (`user`, `metadata`, ...), or
refused with a 400 that names it: a field dropped in silence would change
what the client asked for. Unknown fields are refused, as OpenAI does.
The range checks that depend on the model (max tokens, stop sequences,
input size) stay the core's (services.common.validation); `param_of` gives
their fields OpenAI's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.adapter.tool_calls.request import (
    check_tool_results,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
)
from services.adapter.tool_calls.types import Turn
from services.common.errors import FieldViolation, MeshError, Reason, clip, invalid
from services.common.parameters import MAX_TOP_LOGPROBS, PARAMS
from services.common.types import RAW_SCENARIO, GenerationRequest, Grammar, Message, Parameters

Kind = Literal["chat", "completion"]

# Choices per request (`n`): each one a generation of its own.
MAX_CHOICES = 8

# OpenAI's `developer` role is the newer name of `system`.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}

# `json_object`: any JSON object. TGI refuses a schema without `properties`;
# `additionalProperties` lets the object hold any keys.
ANY_OBJECT: Mapping[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}

# Fields that cannot change the generated text: accepted and left aside.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})

# Fields the mesh cannot honour: accepted only with a value that asks for
# nothing (null, false, 0, empty, or the listed neutral values).
_NEUTRAL: Mapping[str, tuple[object, ...]] = {
    "functions": (), "function_call": ("none",),
    "logit_bias": (), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    # completions only
    "echo": (), "suffix": (), "best_of": (1,),
}
CHAT_ONLY = frozenset({
    "messages", "max_completion_tokens", "tools", "tool_choice", "functions",
    "function_call", "top_logprobs", "modalities", "audio", "prediction",
    "reasoning_effort", "web_search_options", "parallel_tool_calls", "store", "metadata",
    "service_tier",
})
COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
    "stream_options", "frequency_penalty", "presence_penalty", "response_format", "user",
    "logprobs", "logit_bias",
    # Extensions that vLLM and TGI's OpenAI routes accept too.
    "top_k", "repetition_penalty",
})
KNOWN: Mapping[Kind, frozenset[str]] = {
    "chat": COMMON | CHAT_ONLY,
    "completion": COMMON | COMPLETION_ONLY,
}


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed request: the mesh's request and how to answer it."""

    kind: Kind
    generation: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    # Which of `max_completion_tokens` / `max_tokens` the client sent.
    max_tokens_field: str = "max_tokens"
    # How many choices to generate (`n`).
    n: int = 1

    def param_of(self, field: str) -> str | None:
        """OpenAI's name for a field of the mesh's request (`param` of an error)."""
        return param_of(field, self.kind, self.max_tokens_field)


def param_of(field: str, kind: Kind = "chat", max_tokens_field: str = "max_tokens") -> str | None:
    if not field or field == "body":
        return None
    if field == "model_id":
        return "model"
    if field == "inputs":
        return "prompt" if kind == "completion" else "messages"
    if field == "scenario":
        return None
    if field.startswith("parameters."):
        name = field.removeprefix("parameters.")
        if name == "max_new_tokens":
            return max_tokens_field
        if name.startswith("grammar"):
            return "response_format"
        if name == "do_sample":
            return "temperature"
        if name == "top_logprobs" and kind == "completion":
            return "logprobs"  # the legacy API's count of alternatives
        return name
    return field


class _Reader:
    """Reads fields of one body, collecting every problem before failing."""

    def __init__(self, body: Mapping[str, Any], kind: Kind = "chat") -> None:
        self.body = body
        self.kind = kind
        self.bad: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.bad.append(FieldViolation(field, description))

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def number(self, name: str, low: float | None = None, high: float | None = None,
               *, within: str = "") -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            self.fail(name, f"must be a number, got {_show(value)}")
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(name, f"must be {within or f'from {low} to {high}'}, got {value}")
            return None
        return float(value)

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, got {_show(value)}")
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(name, f"must be from {low} to {high}, got {value}")
            return None
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.body.get(name)
        if value is None or isinstance(value, bool):
            return value
        self.fail(name, f"must be true or false, got {_show(value)}")
        return None


def _show(value: Any) -> str:
    """A client value for an error message: its JSON type, or a short repr."""
    if isinstance(value, str):
        return repr(clip(value))
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return clip(repr(value))


def _neutral(name: str, value: Any) -> bool:
    # Python's True == 1: a boolean is neutral only as false, never as a number.
    if isinstance(value, bool):
        return value is False
    if value is None or value in (0, "", [], {}):
        return True
    return any(type(v) is type(value) and v == value for v in _NEUTRAL.get(name, ()))


def _check_fields(r: _Reader, kind: Kind) -> None:
    known = KNOWN[kind]
    for name, value in r.body.items():
        if name not in known:
            other = "completions" if kind == "chat" else "chat completions"
            hint = f" (a field of {other})" if name in KNOWN["completion" if kind == "chat"
                                                           else "chat"] else ""
            r.fail(name, f"unrecognized request argument{hint}")
        elif name in _NEUTRAL and not _neutral(name, value):
            r.fail(name, "not supported by this server")


def _model(r: _Reader) -> str:
    model = r.get("model")
    if not isinstance(model, str) or not model.strip():
        r.fail("model", "is required: a model id or alias (GET /v1/models lists them)")
        return ""
    return model


def _stop(r: _Reader) -> tuple[str, ...]:
    stop = r.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    r.fail("stop", "must be a string or an array of strings")
    return ()


def _grammar(r: _Reader) -> Grammar | None:
    """`response_format` as the grammar the engine enforces."""
    fmt = r.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        r.fail("response_format", f"must be an object, got {_show(fmt)}")
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema(dict(ANY_OBJECT))
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            r.fail("response_format.json_schema",
                   "must be an object with a `schema` (and a `name`)")
            return None
        schema = spec.get("schema", dict(ANY_OBJECT))
        if not isinstance(schema, dict):
            r.fail("response_format.json_schema.schema", "must be a JSON schema object")
            return None
        return Grammar.json_schema(schema)
    r.fail("response_format.type",
           f"must be text, json_object or json_schema, got {_show(kind)}")
    return None


def _numbers(r: _Reader, max_field: str) -> dict[str, Any]:
    """The parameter table's OpenAI fields, read with their types and ranges."""
    out: dict[str, Any] = {}
    for param in PARAMS:
        spec = param.openai
        if spec is None:
            continue
        name = max_field if param.name == "max_new_tokens" else spec.name
        if spec.integer:
            low = None if spec.low is None else int(spec.low)
            high = None if spec.high is None else int(spec.high)
            out[param.name] = r.integer(name, low, high)
        else:
            out[param.name] = r.number(name, spec.low, spec.high)
    return out


def _parameters(r: _Reader) -> tuple[Parameters, str]:
    max_field = "max_completion_tokens" if r.get("max_completion_tokens") is not None else (
        "max_tokens"
    )
    values = _numbers(r, max_field)
    temperature, top_p, top_k = values["temperature"], values["top_p"], values["top_k"]
    if top_p == 0:
        r.fail("top_p", "must be greater than 0 (temperature 0 asks for greedy decoding)")
    logprobs, top_logprobs = _logprobs(r, values["top_logprobs"])
    greedy = temperature == 0
    params = Parameters(
        max_new_tokens=values["max_new_tokens"],
        # Temperature 0 means greedy decoding: no sampling knob goes on.
        temperature=None if greedy else temperature,
        # top_p 1 keeps every token: the same as no nucleus sampling.
        top_p=None if greedy or top_p is None or top_p >= 1 else top_p,
        top_k=None if greedy or top_k in (None, -1, 0) else top_k,
        repetition_penalty=values["repetition_penalty"],
        stop=_stop(r),
        seed=values["seed"],
        do_sample=False if greedy else None,
        grammar=_grammar(r),
        frequency_penalty=values["frequency_penalty"] or None,
        presence_penalty=values["presence_penalty"] or None,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return params, max_field


def _logprobs(r: _Reader, top: int | None) -> tuple[bool | None, int | None]:
    """Chat: `logprobs` true, and `top_logprobs` alternatives (which need it).
    Completions: `logprobs` is the count of alternatives (0 for none)."""
    if r.kind == "completion":
        count = r.integer("logprobs", 0, MAX_TOP_LOGPROBS)
        return (True, count or None) if count is not None else (None, None)
    wanted = r.boolean("logprobs")
    if top and not wanted:
        r.fail("top_logprobs", "requires logprobs: true")
    return (True, top or None) if wanted else (None, None)


def _choices(r: _Reader) -> int:
    """`n`: from 1 to MAX_CHOICES choices, and not with `best_of`."""
    n = r.integer("n", 1, MAX_CHOICES)
    if n is None:
        return 1
    best_of = r.get("best_of")
    if n > 1 and best_of not in (None, 1):
        r.fail("n", "cannot be combined with best_of")
    return n


def _stream(r: _Reader) -> tuple[bool, bool]:
    stream = bool(r.boolean("stream"))
    options = r.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            r.fail("stream_options", f"must be an object, got {_show(options)}")
        else:
            for key, value in options.items():
                if key != "include_usage":
                    r.fail(f"stream_options.{key}", "unrecognized stream option")
                elif not isinstance(value, bool):
                    r.fail("stream_options.include_usage", "must be true or false")
                else:
                    include_usage = value
    return stream, include_usage


# A bound on parsing; a conversation's length is bounded by the model's context.
MAX_MESSAGES = 1000

_MESSAGE_KEYS = frozenset({"role", "content", "name", "refusal", "tool_calls", "function_call",
                           "tool_call_id", "audio"})


def _content(r: _Reader, where: str, content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                r.fail(f"{where}[{j}]", "must be an object such as {\"type\": \"text\", ...}")
            elif part.get("type") != "text":
                r.fail(f"{where}[{j}].type",
                       f"only text parts are supported, got {_show(part.get('type'))}")
            elif not isinstance(part.get("text"), str):
                r.fail(f"{where}[{j}].text", "must be a string")
            else:
                texts.append(part["text"])
        return "\n".join(texts)
    r.fail(where, "must be a string or a non-empty array of text parts")
    return None


def _messages(r: _Reader) -> tuple[Message, ...]:
    raw = r.get("messages")
    if not isinstance(raw, list) or not raw:
        r.fail("messages", "must be a non-empty array of messages")
        return ()
    if len(raw) > MAX_MESSAGES:
        # Bounds parsing only: the model's context bounds a conversation.
        r.fail("messages", f"at most {MAX_MESSAGES} messages, got {len(raw)}")
        return ()
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            r.fail(where, "must be an object with `role` and `content`")
            continue
        for key, value in message.items():
            if key not in _MESSAGE_KEYS:
                r.fail(f"{where}.{key}", "unrecognized message field")
            elif key in ("function_call", "audio") and value:
                r.fail(f"{where}.{key}", "not supported by this server (use `tool_calls`)")
        role = message.get("role")
        if role not in ROLES:
            r.fail(f"{where}.role",
                   f"must be one of {', '.join(ROLES)}, got {_show(role)}")
            continue
        calls, bad = parse_tool_calls(message.get("tool_calls"), f"{where}.tool_calls")
        r.bad += bad
        if calls and role != "assistant":
            r.fail(f"{where}.tool_calls", "only assistant messages make tool calls")
        call_id = message.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            r.fail(f"{where}.tool_call_id", "is required on a tool message (a string)")
            call_id = ""
        elif role != "tool" and call_id is not None:
            r.fail(f"{where}.tool_call_id", "only tool messages answer a tool call")
        raw_content = message.get("content")
        if raw_content is None and calls:
            content: str | None = ""
        else:
            content = _content(r, f"{where}.content", raw_content)
        if content is not None:
            out.append(Message(ROLES[role], content, calls, call_id or ""))
    return tuple(out)


def _chat(r: _Reader) -> dict[str, Any]:
    """The messages and the tool fields of a chat request."""
    messages = _messages(r)
    tools, bad = parse_tools(r.get("tools"))
    r.bad += bad
    choice, bad = parse_tool_choice(r.get("tool_choice"), tools)
    r.bad += bad
    parallel = r.boolean("parallel_tool_calls")
    if any(m.role == "tool" or m.tool_calls for m in messages):
        r.bad += check_tool_results(
            [Turn(m.role, m.content, m.tool_calls, m.tool_call_id) for m in messages])
    if choice.forced and r.get("response_format") not in (None, {"type": "text"}):
        r.fail("tool_choice", "a forced tool call cannot be combined with `response_format`")
    return {
        "messages": messages, "tools": tools,
        "tool_choice": choice if tools or r.get("tool_choice") is not None else None,
        "parallel_tool_calls": parallel is not False,
    }


def _prompt(r: _Reader) -> str:
    prompt = r.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        r.fail("prompt", f"one prompt per request is supported, got {len(prompt)}")
        return ""
    if not isinstance(prompt, str):
        r.fail("prompt", "must be a string (token arrays are not supported)")
        return ""
    return prompt


def _parse(body: Any, kind: Kind, text: Callable[[_Reader], dict[str, Any]]) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise invalid([FieldViolation("body", "must be a JSON object")])
    r = _Reader(body, kind)
    _check_fields(r, kind)
    model = _model(r)
    fields = text(r)
    params, max_field = _parameters(r)
    n = _choices(r)
    stream, include_usage = _stream(r)
    if r.bad:
        raise invalid(r.bad)
    return OpenAIRequest(
        kind=kind,
        generation=GenerationRequest(model_id=model, parameters=params, **fields),
        stream=stream,
        include_usage=include_usage,
        max_tokens_field=max_field,
        n=n,
    )


def parse_chat(body: Any) -> OpenAIRequest:
    """A `POST /v1/chat/completions` body: the messages go through the model's
    chat template in its adapter, as the native API's do."""
    return _parse(body, "chat", _chat)


def parse_completion(body: Any) -> OpenAIRequest:
    """A `POST /v1/completions` body: the prompt goes to the model verbatim."""
    return _parse(body, "completion", lambda r: {"inputs": _prompt(r), "scenario": RAW_SCENARIO})


def openai_error(error: MeshError, request: OpenAIRequest | None) -> tuple[str, str | None]:
    """The message and `param` of an error, in OpenAI's names."""
    if not error.violations:
        # The engine's own refusal of a grammar (TGI's 422) names no field.
        grammar = request is not None and request.generation.parameters.grammar is not None
        if grammar and error.reason is Reason.INVALID_ARGUMENT and "grammar" in error.message:
            return error.message, "response_format"
        return error.message, None

    def name(field: str) -> str:
        param = request.param_of(field) if request is not None else param_of(field)
        return param or field

    first = error.violations[0].field
    text = "; ".join(f"{name(v.field)}: {v.description}" for v in error.violations)
    what = error.message.split(":", 1)[0]  # "invalid request" (and how many problems)
    return f"{what}: {text}", name(first) if first != "body" else None
