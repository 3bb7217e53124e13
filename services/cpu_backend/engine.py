"""The engine seam: what the HTTP layer needs from a model backend.

An engine turns prompt token ids into a stream of generated tokens, one async
iterator per request. It knows nothing about HTTP, TGI's validation or stop
sequences: `core.TgiCore` applies those on top, exactly once, for every
engine. Two implementations:

* `scheduler.BatchScheduler` over `llama_model.LlamaBatchModel`: the CPU
  backend, continuous batching on one engine thread;
* `tools.tgi_double.ScriptedEngine`: the TGI double, tokens on a clock
  per request, with injectable faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, shaped like TGI's `Token` plus an end-of-sequence flag."""

    # Vocabulary id.
    id: int
    # Decoded text; "" while a multi-byte character is still incomplete.
    text: str
    # Log-probability of the token, None when the engine cannot tell.
    logprob: float | None
    # True for control tokens (<|im_end|>, </s>...), which TGI leaves out of
    # generated_text.
    special: bool
    # True when the engine considers this token the end of generation.
    eos: bool = False
    # The `top_n_tokens` most likely tokens at this step (TGI's top_tokens),
    # most likely first; empty unless asked for.
    top_tokens: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated generation parameters, already resolved to concrete values."""

    # Hard cap on generated tokens; the engine must not produce more.
    max_new_tokens: int
    # False means greedy decoding; the warpers below are then ignored.
    do_sample: bool
    temperature: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    # 1.0 disables nucleus sampling.
    top_p: float = 1.0
    # 1.0 disables typical sampling.
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    # Always set (TGI draws a random one when the client sends none).
    seed: int = 0
    # GBNF grammar the output must match (TGI's `grammar`, already converted).
    grammar: str | None = None
    # How many alternatives to report per token (TGI's top_n_tokens).
    top_n_tokens: int = 0


class EngineError(Exception):
    """Generation failed inside the engine; TGI reports it as a 424 `generation` error."""


class OnStart(Protocol):
    """Called when a request joins the running batch."""

    def __call__(self, cached_tokens: int = 0) -> None:
        """`cached_tokens`: leading prompt tokens whose prefill the engine
        skipped, their KV cells being cached from an earlier request."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What `server.create_app` needs from a model backend."""

    @property
    def model_id(self) -> str:
        """Name of the loaded model (the served name may differ)."""
        ...

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own special-token rules."""
        ...

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Text of each token on its own (used by /tokenize and prefill details)."""
        ...

    def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_start: OnStart | None = None,
    ) -> AsyncIterator[Token]:
        """Stream tokens until EOS or `params.max_new_tokens`.

        `on_start` is called on the event loop when the request leaves the
        waiting queue and joins the running batch (the end of its queue
        time), with how many prompt tokens it found cached. Closing the
        iterator early (aclose, or cancelling the task iterating it) must
        drop the request from the queue or the batch.
        """
        ...

    async def health(self) -> bool:
        """True when the engine can serve requests."""
        ...

    async def close(self) -> None:
        """Stop running generations and release the model."""
        ...
