"""Conversion between the llmmesh.v1 messages and the domain types.

The generation parameters go field by field by their names, which the
parameter table (services.common.parameters), `Parameters` and the proto
share.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from llmmesh.v1 import generate_pb2 as pb

from services.common.errors import MeshError, Reason
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


def request_from_pb(r: AnyGenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        model_id=r.model_id,
        inputs=r.inputs,
        scenario=r.scenario,
        parameters=parameters_from_pb(r.parameters),
        messages=tuple(Message(m.role, m.content) for m in r.messages),
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
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in r.messages],
    )
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
    )


def chunk_to_pb(c: Chunk) -> pb.GenerateStreamResponse:
    if c.logprobs:
        return pb.GenerateStreamResponse(
            text=c.text, tokens=c.tokens, logprobs=[logprob_to_pb(t) for t in c.logprobs]
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
                     logprobs=tuple(logprob_from_pb(t) for t in m.logprobs))
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
