"""TGI's request validation: parameter checks, tokenization and length limits.

`Validator.validate` runs TGI's checks in TGI's order with TGI's messages
(router/src/validation.rs); the first failure raises InferError(validation).
Transport-free: nothing here imports aiohttp.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from services.cpu_backend.engine import SamplingParams
from services.cpu_backend.errors import InferError
from services.cpu_backend.grammar import grammar_to_gbnf
from services.cpu_backend.schema import GenerateParameters, GenerateRequest
from services.cpu_backend.settings import ServerSettings

# When max_new_tokens is null TGI checks the length limit with at most this
# many new tokens (router/src/validation.rs DEFAULT_GENERATION_LENGTH).
DEFAULT_GENERATION_LENGTH: Final = 1024


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation, ready for the engine."""

    inputs: str
    input_ids: tuple[int, ...]
    input_length: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    # Whether the reply carries `details` (unary: details or decoder_input_details).
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    # Seed reported in details; TGI reports it only when sampling.
    reported_seed: int | None
    # The max_new_tokens TGI validated against (metric tgi_request_max_new_tokens).
    max_new_tokens: int


class Validator:
    """TGI's `Validation`: parameter checks, tokenization and length limits."""

    def __init__(
        self,
        settings: ServerSettings,
        tokenize: Callable[[str], Awaitable[list[int]]],
        rng: random.Random | None = None,
    ) -> None:
        self._s = settings
        self._tokenize = tokenize
        self._rng = rng or random.Random()

    def random_seed(self) -> int:
        """A seed as TGI draws one when the client sends none (a random u64)."""
        return self._rng.getrandbits(64)

    def check_before_admission(self, params: GenerateParameters, *, stream: bool) -> None:
        """Checks TGI makes before taking a concurrency permit (no 429 can hide them)."""
        if stream:
            if (params.best_of if params.best_of is not None else 1) != 1:
                raise InferError.validation("`best_of` != 1 is not supported when streaming tokens")
            if params.decoder_input_details:
                raise InferError.validation(
                    "`decoder_input_details` == true is not supported when streaming tokens"
                )
        elif params.best_of is not None and params.best_of > 1:
            if self._s.max_best_of == 1:
                raise InferError.validation("`best_of` != 1 is not allowed for this endpoint")
            if params.best_of > self._s.max_best_of:
                raise InferError.validation(
                    f"`best_of` must be > 0 and <= {self._s.max_best_of}. Given: {params.best_of}"
                )

    async def tokenize(self, inputs: str, truncate: int | None) -> list[int]:
        try:
            ids = await self._tokenize(inputs)
        except Exception as exc:  # the engine's tokenizer is foreign code
            raise InferError.validation(f"tokenizer error {exc}") from exc
        if truncate is not None and len(ids) > truncate:
            # TGI keeps the END of the prompt (TruncationDirection::Left).
            ids = ids[len(ids) - truncate :]
        return ids

    async def validate(
        self, request: GenerateRequest, *, default_return_full_text: bool
    ) -> ValidRequest:
        """Run TGI's checks in TGI's order; raise InferError(validation) on the first failure."""
        p = request.parameters
        s = self._s
        best_of = p.best_of if p.best_of is not None else 1
        sampling_requested = (
            p.do_sample
            or p.temperature is not None
            or p.top_k is not None
            or p.top_p is not None
            or p.typical_p is not None
        )
        if best_of > 1 and not sampling_requested:
            raise InferError.validation("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0.0:
            raise InferError.validation("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0.0:
            raise InferError.validation("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise InferError.validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0
        if p.top_p is not None:
            if p.top_p <= 0.0 or p.top_p >= 1.0:
                raise InferError.validation("`top_p` must be > 0.0 and < 1.0")
            top_p = p.top_p
        typical_p = 1.0
        if p.typical_p is not None:
            if p.typical_p <= 0.0 or p.typical_p >= 1.0:
                raise InferError.validation("`typical_p` must be > 0.0 and < 1.0")
            typical_p = p.typical_p
        top_k = 0
        if p.top_k is not None:
            if p.top_k <= 0:
                raise InferError.validation("`top_k` must be strictly positive")
            top_k = p.top_k
        if p.max_new_tokens == 0:
            raise InferError.validation("`max_new_tokens` must be strictly positive")
        if len(p.stop) > s.max_stop_sequences:
            raise InferError.validation(
                f"`stop` supports up to {s.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is None:
            seed = self.random_seed()
        else:
            if best_of > 1:
                raise InferError.validation("`seed` must not be set when `best_of` > 1")
            seed = p.seed
        top_n_tokens = 0 if p.top_n_tokens is None else p.top_n_tokens
        if top_n_tokens > s.max_top_n_tokens:
            raise InferError.validation(
                f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {top_n_tokens}"
            )
        if not request.inputs:
            raise InferError.validation("`inputs` cannot be empty")
        if p.truncate is not None and (p.truncate == 0 or p.truncate > s.max_input_tokens):
            raise InferError.validation(
                f"`truncate` must be strictly positive and less than {s.max_input_tokens}. "
                f"Given: {p.truncate}"
            )
        input_ids = await self.tokenize(request.inputs, p.truncate)
        input_length = len(input_ids)
        if p.max_new_tokens is not None:
            max_new_tokens = max_total_new_tokens = p.max_new_tokens
        else:
            # null: as many as fit; TGI checks the first 1024-token slice and
            # re-queues the request until the total is used up.
            max_total_new_tokens = max(s.max_total_tokens - input_length, 0)
            max_new_tokens = min(max_total_new_tokens, DEFAULT_GENERATION_LENGTH)
        if input_length + max_new_tokens > s.max_total_tokens:
            raise InferError.validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {s.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > s.max_input_tokens:
            raise InferError.validation(
                f"`inputs` must have less than {s.max_input_tokens} tokens. Given: {input_length}"
            )
        # TGI validates the grammar last, after the length checks.
        gbnf = None if p.grammar is None else grammar_to_gbnf(p.grammar)
        # TGI's Python server samples when do_sample is set OR any warper is
        # active, and reports the seed only in that case.
        do_sample = (
            p.do_sample or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
        )
        sampling = SamplingParams(
            max_new_tokens=max_total_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            grammar=gbnf,
            top_n_tokens=top_n_tokens,
        )
        return_full_text = (
            default_return_full_text if p.return_full_text is None else p.return_full_text
        )
        return ValidRequest(
            inputs=request.inputs,
            input_ids=tuple(input_ids),
            input_length=input_length,
            sampling=sampling,
            stop=p.stop,
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=return_full_text,
            reported_seed=seed if do_sample else None,
            max_new_tokens=max_new_tokens,
        )
