"""What the adapter needs from an engine: the `Engine` protocol and the
engine-facing domain types it speaks.

Each driver (TGI's HTTP API in `engines.tgi`, OpenAI-compatible servers in
`engines.openai_compatible`) implements the protocol and maps its engine's
replies and errors onto these types and `MeshError`; the adapter's core
depends on nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from services.adapter.tool_calls.engine import EngineTools
from services.adapter.tool_calls.types import ToolCall, ToolCallDelta, ToolChoice
from services.common.types import FinishReason, Message, Parameters, TokenLogprob

# What an engine generates from: a prompt the adapter rendered with the
# model's chat template (or a raw one), or, for an engine that applies the
# template itself, the conversation, with the tools offered when the engine
# handles tool calling itself.
Prompt = str | tuple[Message, ...] | EngineTools


@dataclass(frozen=True)
class EngineToken:
    """One or more tokens that arrived together; `text` leaves out special tokens."""

    text: str
    count: int = 1
    # The tokens' logprobs, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Pieces of the tool calls the engine made itself (EngineTools prompts).
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class EngineResult:
    """A whole generation, or the last event of a stream."""

    text: str
    generated_tokens: int
    input_tokens: int
    finish_reason: FinishReason
    # Each generated token's logprob (unary only), when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Prompt tokens the engine reused from its prefix cache (TGI-shaped
    # `details.cached_tokens`, OpenAI's `usage.prompt_tokens_details.cached_tokens`).
    cached_input_tokens: int = 0
    # The tool calls the engine made itself (EngineTools prompts).
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class EngineInfo:
    """What the engine says about itself: the model it serves and its limits."""

    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_concurrent_requests: int


class Engine(Protocol):
    """A text-generation engine behind the adapter.

    `params` arrive with the model's defaults applied (the registry's, over
    the parameter table's), so a driver never invents a default of its own.
    """

    @property
    def applies_template(self) -> bool:
        """True when the engine renders the chat template: it is then given
        the conversation instead of a rendered prompt."""
        ...

    def native_tools(self, choice: ToolChoice) -> bool:
        """True when the engine's own chat API takes tools with this choice:
        it is then given an EngineTools prompt and returns calls itself."""
        ...

    async def generate(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> EngineResult: ...

    def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[EngineToken | EngineResult]: ...

    async def health(self, timeout: float = 2.0) -> bool: ...

    async def info(self, timeout: float = 2.0) -> EngineInfo: ...

    async def close(self) -> None: ...
