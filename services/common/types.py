"""Domain types shared by the router and the adapters.

They carry no protobuf or gRPC types: the servicers convert at the edge
(`services.common.pb_convert`), so the cores can be tested without a transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Literal

from services.adapter.tool_calls.types import Tool, ToolCall, ToolCallDelta, ToolChoice


class FinishReason(StrEnum):
    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ERROR = "error"
    TOOL_CALLS = "tool_calls"


ROLES = ("system", "user", "assistant", "tool")

# The scenarios every service knows: `chat` (the default: the text is a user
# turn, rendered with the model's chat template) and `raw` (the text goes to
# the model verbatim). The router's scenarios.yaml adds templated ones.
CHAT_SCENARIO = "chat"
RAW_SCENARIO = "raw"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # An assistant turn's calls, and on a `tool` turn the call it answers.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text (structured output).

    `kind` "json": the text is JSON that conforms to the JSON schema `value`
    (a dict, as parsed at the edge and carried in that one form to the engine
    driver); "regex": the text matches the regular expression `value`. The
    same two kinds as TGI's `grammar` parameter.
    """

    kind: Literal["json", "regex"]
    value: Any

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Grammar:
        return cls("json", schema)

    def schema(self) -> dict[str, Any]:
        """The JSON schema of a "json" grammar."""
        assert isinstance(self.value, dict)
        return self.value


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, with the most likely tokens at
    its step (`top`, most likely first; each with an empty `top`).

    `bytes` is the token's UTF-8 bytes, which say what a token that is only
    part of a character holds (its `token` text cannot)."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Parameters:
    """Generation parameters; None means "the model's default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    do_sample: bool | None = None
    grammar: Grammar | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # Return each generated token's logprob (and `top_logprobs` alternatives).
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def with_defaults(self, defaults: Parameters) -> Parameters:
        """Fill every unset field (None, or no stop sequences) from `defaults`."""
        changes = {}
        for name in _PARAMETER_NAMES:
            value = getattr(self, name)
            if value is not None and value != ():
                changes[name] = value
        return replace(defaults, **changes) if changes else defaults

    @property
    def sampling(self) -> bool:
        """Whether to sample: explicit do_sample wins, else any sampling knob."""
        if self.do_sample is not None:
            return self.do_sample
        return any(v is not None for v in (self.temperature, self.top_p, self.top_k))

    @property
    def wants_logprobs(self) -> bool:
        """Whether the reply carries logprobs: asked for, or alternatives asked for."""
        return bool(self.logprobs) or bool(self.top_logprobs)


_PARAMETER_NAMES = tuple(f.name for f in fields(Parameters))


class ResumePolicy(StrEnum):
    """Whether a stream broken after its first text may continue on another
    replica (the wire's ResumePolicy; `x-llmmesh-resume` names the values)."""

    DEFAULT = ""  # deterministic requests only
    ALLOW = "allow"  # sampled requests too: their continuation is a new sample
    NEVER = "never"


@dataclass(frozen=True)
class GenerationRequest:
    model_id: str
    inputs: str = ""
    scenario: str = ""
    parameters: Parameters = field(default_factory=Parameters)
    messages: tuple[Message, ...] = ()
    resume: ResumePolicy = ResumePolicy.DEFAULT
    tools: tuple[Tool, ...] = ()
    # None: `auto` with tools, `none` without.
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def evolve(self, **changes: object) -> GenerationRequest:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Generation:
    """The result of a whole generation (also the last event of a stream)."""

    text: str
    model: str
    model_id: str
    tokens: int
    input_tokens: int
    finish_reason: FinishReason
    # How many times a stream continued on another replica (the router's).
    resumes: int = 0
    # Each generated token's logprob, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Prompt tokens the engine reused from its prefix cache.
    cached_input_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """Text produced since the previous chunk, and the tokens so far."""

    text: str
    tokens: int
    # The logprobs of this chunk's tokens, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Limits:
    """What a model accepts; the adapter learns the token limits from TGI."""

    max_new_tokens: int = 1024
    max_stop_sequences: int = 4
    max_input_chars: int = 32_000
    max_input_tokens: int = 0
    max_total_tokens: int = 0
    # Bounds parsing only: the context bounds a conversation, in tokens.
    max_messages: int = 1000


@dataclass(frozen=True)
class EngineLoad:
    """An engine's load, read from its own metrics: requests queued and
    running, and the fraction of its KV cache in use (None: not reported)."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float | None = None

    @property
    def requests(self) -> int:
        return self.waiting + self.running


@dataclass(frozen=True)
class ModelInfo:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    # The model name the engine reports (the wire calls it backend_model).
    engine_model: str = ""
    limits: Limits = field(default_factory=Limits)
    ready: bool = False
    replicas: int = 1
    ready_replicas: int = 0
    # The engine's load (an adapter's), or the sum over replicas (the
    # router's); None when no engine reports one.
    load: EngineLoad | None = None
