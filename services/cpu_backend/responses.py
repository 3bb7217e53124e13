"""TGI's response shapes: GenerateResponse, StreamResponse, TokenizeResponse.

Field order and omissions follow TGI's serde structs (router/src/lib.rs):
`top_tokens` and `best_of_sequences` are left out when empty, as serde's
`skip_serializing_if` does, so replies without them are byte-identical to
TGI's. Transport-free: nothing here imports aiohttp.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.cpu_backend.engine import Token
from services.cpu_backend.validation import ValidRequest


def dumps(obj: Any) -> bytes:
    """Compact JSON like serde_json: no spaces, raw UTF-8, no NaN."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def token_json(token: Token) -> dict[str, Any]:
    logprob = token.logprob
    if logprob is not None and not math.isfinite(logprob):
        logprob = None  # serde_json writes NaN as null
    return {"id": token.id, "text": token.text, "logprob": logprob, "special": token.special}


def _top_tokens_json(token: Token) -> list[dict[str, Any]]:
    return [token_json(t) for t in token.top_tokens]


@dataclass
class Generation:
    """The outcome of one finished generation."""

    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    # Prompt tokens whose prefill the engine skipped (prefix cache).
    cached_tokens: int = 0

    def mean_logprob(self) -> float:
        """TGI's best_of score: mean log-probability of the generated tokens."""
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(values) / len(values) if values else -math.inf


def _full_text(valid: ValidRequest, gen: Generation) -> str:
    return valid.inputs + gen.text if valid.return_full_text else gen.text


def _details(
    valid: ValidRequest, gen: Generation, prefill: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "finish_reason": gen.finish_reason,
        "generated_tokens": len(gen.tokens),
        "seed": valid.reported_seed,
        "prefill": list(prefill),
        "tokens": [token_json(t) for t in gen.tokens],
        # Not in TGI, which reports no prefix-cache use per request; vLLM
        # reports it as usage.prompt_tokens_details.cached_tokens.
        "cached_tokens": gen.cached_tokens,
    }


def generate_response(
    valid: ValidRequest,
    gen: Generation,
    prefill: Sequence[dict[str, Any]],
    others: Sequence[tuple[ValidRequest, Generation]] = (),
) -> dict[str, Any]:
    """TGI's GenerateResponse (details only when asked).

    `others` are the sequences best_of did not pick; TGI lists them in
    `details.best_of_sequences`.
    """
    out: dict[str, Any] = {"generated_text": _full_text(valid, gen)}
    if valid.details:
        details = _details(valid, gen, prefill)
        if others:
            sequences = []
            for other_valid, other in others:
                seq: dict[str, Any] = {"generated_text": _full_text(other_valid, other)}
                seq.update(_details(other_valid, other, prefill))
                if other_valid.sampling.top_n_tokens:
                    seq["top_tokens"] = [_top_tokens_json(t) for t in other.tokens]
                sequences.append(seq)
            details["best_of_sequences"] = sequences
        if valid.sampling.top_n_tokens:
            details["top_tokens"] = [_top_tokens_json(t) for t in gen.tokens]
        out["details"] = details
    return out


def stream_event(
    valid: ValidRequest, index: int, token: Token, final: Generation | None, details: bool
) -> dict[str, Any]:
    """TGI's StreamResponse; `final` set only on the last event."""
    event: dict[str, Any] = {"index": index, "token": token_json(token)}
    if token.top_tokens:
        event["top_tokens"] = _top_tokens_json(token)
    event["generated_text"] = None
    event["details"] = None
    if final is not None:
        event["generated_text"] = _full_text(valid, final)
        if details:
            event["details"] = {
                "finish_reason": final.finish_reason,
                "generated_tokens": len(final.tokens),
                "seed": valid.reported_seed,
                "input_length": valid.input_length,
                # Not in TGI (see _details): prompt tokens whose prefill was skipped.
                "cached_tokens": final.cached_tokens,
            }
    return event


def tokenize_response(inputs: str, ids: Sequence[int], texts: Sequence[str]) -> list[dict]:
    """TGI's TokenizeResponse: each token with its character span in `inputs`."""
    out: list[dict] = []
    cursor = 0
    for token_id, text in zip(ids, texts, strict=True):
        at = inputs.find(text, cursor) if text else -1
        # Tokens absent from the text (an added BOS, half a character) get an
        # empty span at the cursor rather than a made-up position.
        start, stop = (at, at + len(text)) if at >= 0 else (cursor, cursor)
        cursor = stop
        out.append({"id": token_id, "text": text, "start": start, "stop": stop})
    return out
