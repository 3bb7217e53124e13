"""Conversion between the llmmesh.v1 messages and the domain types.

The generation parameters go field by field by their names, which the
parameter table (services.common.parameters), `Parameters` and the proto
share.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.tool_calls.types import Tool, ToolCall, ToolCallDelta, ToolChoice
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.parameters import NAMES
from services.common.types import (
    Chunk,
    EngineLoad,
    FinishReason,
    Generation,
    GenerationRequest,
    Grammar,
    Limits,
    Message,
    ModelInfo,
    Parameters,
    ResumePolicy,
    TokenLogprob,
)

_FINISH_TO_PB = {
    FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}

AnyGenerateRequest = pb.GenerateRequest | pb.GenerateStreamRequest


def _value(v: struct_pb2.Value) -> Any:
    """One Struct value as JSON's: a whole number as an int (Struct holds every
    number as a double), so a schema's `"minLength": 1` stays 1."""
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() else n
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return {k: _value(x) for k, x in v.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None


def grammar_from_pb(g: pb.Grammar) -> Grammar | None:
    kind = g.WhichOneof("kind")
    if kind == "json_schema":
        return Grammar("json", {k: _value(v) for k, v in g.json_schema.fields.items()})
    if kind == "regex":
        return Grammar("regex", g.regex)
    return None


def grammar_to_pb(g: Grammar) -> pb.Grammar:
    if g.kind == "regex":
        return pb.Grammar(regex=g.value)
    out = pb.Grammar()
    out.json_schema.update(g.schema())
    return out


def parameters_from_pb(p: pb.GenerationParameters) -> Parameters:
    """The fields the message sets (proto3 `optional`, and stop when it has any)."""
    values: dict[str, Any] = {}
    for fd, value in p.ListFields():
        if fd.name == "grammar":
            values["grammar"] = grammar_from_pb(value)
        elif fd.name == "stop":
            values["stop"] = tuple(value)
        else:
            values[fd.name] = value
    return Parameters(**values) if values else _NO_PARAMETERS


_NO_PARAMETERS = Parameters()


def parameters_to_pb(p: Parameters) -> pb.GenerationParameters:
    out = pb.GenerationParameters()
    for name in NAMES:
        value = getattr(p, name)
        if value is None or value == ():
            continue
        if name == "grammar":
            out.grammar.CopyFrom(grammar_to_pb(value))
        elif name == "stop":
            out.stop.extend(value)
        else:
            setattr(out, name, value)
    return out


_MODE_TO_PB = {
    "none": pb.ToolChoice.MODE_NONE,
    "auto": pb.ToolChoice.MODE_AUTO,
    "required": pb.ToolChoice.MODE_REQUIRED,
    "named": pb.ToolChoice.MODE_NAMED,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


def tool_from_pb(t: pb.Tool, i: int) -> Tool:
    """A tool; its schema's JSON text is decoded here (checked by the caller)."""
    parameters: Any = {}
    if t.parameters_json:
        try:
            parameters = json.loads(t.parameters_json)
        except ValueError as exc:
            raise invalid([FieldViolation(f"tools[{i}].parameters_json",
                                          f"is not valid JSON: {exc}")]) from None
    return Tool(t.name, t.description, parameters, t.strict)


def tool_to_pb(t: Tool) -> pb.Tool:
    return pb.Tool(name=t.name, description=t.description,
                   parameters_json=json.dumps(t.parameters, ensure_ascii=False)
                   if t.parameters else "", strict=t.strict)


def call_from_pb(c: pb.ToolCall) -> ToolCall:
    return ToolCall(c.id, c.name, c.arguments)


def call_to_pb(c: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)


def _message_from_pb(m: pb.ChatMessage) -> Message:
    if not m.tool_calls and not m.tool_call_id:
        return Message(m.role, m.content)
    return Message(m.role, m.content, tuple(call_from_pb(c) for c in m.tool_calls),
                   m.tool_call_id)


def _message_to_pb(m: Message) -> pb.ChatMessage:
    return pb.ChatMessage(role=m.role, content=m.content,
                          tool_calls=[call_to_pb(c) for c in m.tool_calls],
                          tool_call_id=m.tool_call_id)


def request_from_pb(r: AnyGenerateRequest) -> GenerationRequest:
    tools = tuple(tool_from_pb(t, i) for i, t in enumerate(r.tools))
    choice = None
    if r.HasField("tool_choice") and r.tool_choice.mode != pb.ToolChoice.MODE_UNSPECIFIED:
        choice = ToolChoice(_MODE_FROM_PB.get(r.tool_choice.mode, "auto"),  # type: ignore[arg-type]
                            r.tool_choice.name)
    return GenerationRequest(
        model_id=r.model_id,
        inputs=r.inputs,
        scenario=r.scenario,
        parameters=parameters_from_pb(r.parameters),
        messages=tuple(_message_from_pb(m) for m in r.messages),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=r.parallel_tool_calls if r.HasField("parallel_tool_calls") else True,
        resume=_RESUME_FROM_PB.get(r.resume, ResumePolicy.DEFAULT)
        if isinstance(r, pb.GenerateStreamRequest) else ResumePolicy.DEFAULT,
    )


R = TypeVar("R", pb.GenerateRequest, pb.GenerateStreamRequest)


def request_to_pb(r: GenerationRequest, cls: type[R]) -> R:
    out = cls(
        model_id=r.model_id,
        inputs=r.inputs,
        scenario=r.scenario,
        parameters=parameters_to_pb(r.parameters),
        messages=[_message_to_pb(m) for m in r.messages],
        tools=[tool_to_pb(t) for t in r.tools],
    )
    if r.tool_choice is not None:
        out.tool_choice.CopyFrom(pb.ToolChoice(mode=_MODE_TO_PB[r.tool_choice.mode],
                                               name=r.tool_choice.name))
    if not r.parallel_tool_calls:
        out.parallel_tool_calls = False
    if r.resume is not ResumePolicy.DEFAULT and isinstance(out, pb.GenerateStreamRequest):
        out.resume = _RESUME_TO_PB[r.resume]
    return out


_RESUME_TO_PB = {
    ResumePolicy.DEFAULT: pb.RESUME_POLICY_UNSPECIFIED,
    ResumePolicy.ALLOW: pb.RESUME_POLICY_ALLOW,
    ResumePolicy.NEVER: pb.RESUME_POLICY_NEVER,
}
_RESUME_FROM_PB = {v: k for k, v in _RESUME_TO_PB.items()}


def logprob_to_pb(t: TokenLogprob) -> pb.TokenLogprob:
    out = pb.TokenLogprob(
        token=t.token, logprob=t.logprob, top_logprobs=[logprob_to_pb(a) for a in t.top]
    )
    if t.bytes is not None:
        out.token_bytes = bytes(t.bytes)
    return out


def logprob_from_pb(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token=m.token,
        logprob=m.logprob,
        bytes=tuple(m.token_bytes) if m.HasField("token_bytes") else None,
        top=tuple(logprob_from_pb(a) for a in m.top_logprobs),
    )


def generation_to_pb(g: Generation) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        generated_text=g.text,
        model=g.model,
        model_id=g.model_id,
        tokens=g.tokens,
        input_tokens=g.input_tokens,
        finish_reason=_FINISH_TO_PB[g.finish_reason],
        logprobs=[logprob_to_pb(t) for t in g.logprobs],
        cached_input_tokens=g.cached_input_tokens,
        tool_calls=[call_to_pb(c) for c in g.tool_calls],
    )


def generation_from_pb(r: pb.GenerateResponse) -> Generation:
    return Generation(
        text=r.generated_text,
        model=r.model,
        model_id=r.model_id,
        tokens=r.tokens,
        input_tokens=r.input_tokens,
        finish_reason=_FINISH_FROM_PB.get(r.finish_reason, FinishReason.UNSPECIFIED),
        logprobs=tuple(logprob_from_pb(t) for t in r.logprobs),
        cached_input_tokens=r.cached_input_tokens,
        tool_calls=tuple(call_from_pb(c) for c in r.tool_calls),
    )


def delta_to_pb(d: ToolCallDelta) -> pb.ToolCallDelta:
    return pb.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "",
                            arguments=d.arguments)


def delta_from_pb(d: pb.ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(d.index, d.arguments, d.id or None, d.name or None if d.id else None)


def chunk_to_pb(c: Chunk) -> pb.GenerateStreamResponse:
    if c.logprobs or c.tool_calls:
        return pb.GenerateStreamResponse(
            text=c.text, tokens=c.tokens, logprobs=[logprob_to_pb(t) for t in c.logprobs],
            tool_calls=[delta_to_pb(d) for d in c.tool_calls],
        )
    return pb.GenerateStreamResponse(text=c.text, tokens=c.tokens)


def final_to_pb(g: Generation) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        tokens=g.tokens,
        finish_reason=_FINISH_TO_PB[g.finish_reason],
        generated_text=g.text,
        model=g.model,
        model_id=g.model_id,
        input_tokens=g.input_tokens,
        resumes=g.resumes,
        cached_input_tokens=g.cached_input_tokens,
        # The last message holds the whole calls, as generated_text the whole text.
        tool_calls=[pb.ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments)
                    for i, c in enumerate(g.tool_calls)],
    )


def failure_to_pb(error: MeshError, tokens: int) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        tokens=tokens,
        finish_reason=pb.FINISH_REASON_ERROR,
        error=pb.StreamError(code=error.code, reason=error.reason.value, message=error.message),
    )


def stream_error_from_pb(e: pb.StreamError) -> MeshError:
    """An in-band stream error as the MeshError it was raised as."""
    reason = Reason(e.reason) if e.reason in Reason.__members__ else Reason.INTERNAL
    return MeshError(reason, e.message)


def stream_event_from_pb(m: pb.GenerateStreamResponse) -> Chunk | Generation | MeshError:
    """Decode one stream message: a chunk, the final result, or an in-band error."""
    if m.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return Chunk(text=m.text, tokens=m.tokens,
                     logprobs=tuple(logprob_from_pb(t) for t in m.logprobs),
                     tool_calls=tuple(delta_from_pb(d) for d in m.tool_calls))
    if m.finish_reason == pb.FINISH_REASON_ERROR:
        return stream_error_from_pb(m.error)
    return Generation(
        text=m.generated_text,
        model=m.model,
        model_id=m.model_id,
        tokens=m.tokens,
        input_tokens=m.input_tokens,
        finish_reason=_FINISH_FROM_PB[m.finish_reason],
        resumes=m.resumes,
        cached_input_tokens=m.cached_input_tokens,
        tool_calls=tuple(ToolCall(d.id, d.name, d.arguments) for d in m.tool_calls),
    )


def load_to_pb(load: EngineLoad) -> pb.EngineLoad:
    out = pb.EngineLoad(waiting=load.waiting, running=load.running)
    if load.kv_cache_usage is not None:
        out.kv_cache_usage = load.kv_cache_usage
    return out


def load_from_pb(m: pb.EngineLoad) -> EngineLoad:
    return EngineLoad(
        waiting=m.waiting,
        running=m.running,
        kv_cache_usage=m.kv_cache_usage if m.HasField("kv_cache_usage") else None,
    )


def model_to_pb(m: ModelInfo) -> pb.Model:
    return pb.Model(
        id=m.id,
        aliases=list(m.aliases),
        name=m.name,
        backend_model=m.engine_model,
        max_input_tokens=m.limits.max_input_tokens,
        max_total_tokens=m.limits.max_total_tokens,
        max_new_tokens=m.limits.max_new_tokens,
        max_stop_sequences=m.limits.max_stop_sequences,
        ready=m.ready,
        replicas=m.replicas,
        ready_replicas=m.ready_replicas,
        load=load_to_pb(m.load) if m.load is not None else None,
    )


def model_from_pb(m: pb.Model, static: Limits) -> ModelInfo:
    """A peer's model description; `static` fills the limits the message lacks."""
    return ModelInfo(
        id=m.id,
        name=m.name,
        aliases=tuple(m.aliases),
        engine_model=m.backend_model,
        limits=replace(
            static,
            max_new_tokens=m.max_new_tokens,
            max_stop_sequences=m.max_stop_sequences,
            max_input_tokens=m.max_input_tokens,
            max_total_tokens=m.max_total_tokens,
        ),
        ready=m.ready,
        replicas=m.replicas,
        ready_replicas=m.ready_replicas,
        load=load_from_pb(m.load) if m.HasField("load") else None,
    )
