"""OpenAI's response shapes, built from the mesh's domain types.

Chat: `chat.completion` and, streamed, `chat.completion.chunk` objects;
completions: `text_completion` (streamed as the same object, as OpenAI
does); models: `list` and `model`. The llmmesh facts of a model ride along
as extra fields, which OpenAI's SDKs keep.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from services.adapter.tool_calls.types import ToolCallDelta
from services.common.types import FinishReason, Generation, ModelInfo, TokenLogprob
from services.openai.requests import Kind

OWNER = "llmmesh"

# End of sequence and stop sequences are both OpenAI's `stop`.
FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.UNSPECIFIED: "stop",
    FinishReason.TOOL_CALLS: "tool_calls",
}


def new_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"


def usage(result: Generation | Sequence[Generation]) -> dict[str, Any]:
    """Token counts; over several choices, the completion tokens summed and the
    prompt counted once, as OpenAI counts them; the prompt tokens the engine
    reused from its prefix cache as `prompt_tokens_details.cached_tokens` (as
    OpenAI, vLLM and SGLang say it)."""
    results = [result] if isinstance(result, Generation) else list(result)
    prompt = max((r.input_tokens for r in results), default=0)
    generated = sum(r.tokens for r in results)
    cached = max((r.cached_input_tokens for r in results), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob,
            "bytes": list(t.bytes) if t.bytes is not None else None}


def logprobs(
    kind: Kind, tokens: Sequence[TokenLogprob], top: int, offset: int = 0
) -> dict[str, Any]:
    """A choice's `logprobs`: chat's `content` list, or the legacy
    `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` (offsets
    into the generated text, from `offset`; `top_logprobs` null when no
    alternatives were asked for)."""
    if kind == "chat":
        return {
            "content": [{**_token(t), "top_logprobs": [_token(a) for a in t.top]}
                        for t in tokens],
            "refusal": None,
        }
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens] if top else None,
        "text_offset": offsets,
    }


def completion(
    kind: Kind, result: Generation, *, id: str, created: int, top: int | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    """A whole answer: `chat.completion` or `text_completion`. `text` replaces
    the result's (the text without a matched stop sequence)."""
    finish = FINISH.get(result.finish_reason, "stop")
    text = result.text if text is None else text
    choice: dict[str, Any]
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if result.tool_calls:
            message["content"] = text or None
            message["tool_calls"] = [c.openai() for c in result.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if top is not None:
        choice["logprobs"] = logprobs(kind, result.logprobs, top)
    return {
        "id": id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": result.model_id,
        "choices": [choice],
        "usage": usage(result),
    }


def completions(
    kind: Kind, results: Sequence[Generation], *, id: str, created: int,
    top: int | None = None, texts: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """A whole answer of several choices (`n`), indexed in order; `texts`
    replace the results' (without a matched stop sequence)."""
    shown = list(texts) if texts is not None else [None] * len(results)
    out = completion(kind, results[0], id=id, created=created, top=top, text=shown[0])
    out["choices"] = [
        {**completion(kind, r, id=id, created=created, top=top, text=t)["choices"][0],
         "index": i}
        for i, (r, t) in enumerate(zip(results, shown, strict=True))
    ]
    out["usage"] = usage(results)
    return out


class ChunkShapes:
    """The events of one stream: same id, model and time on every chunk."""

    def __init__(
        self, kind: Kind, model: str, include_usage: bool, top: int | None = None
    ) -> None:
        self.kind = kind
        # Alternatives per token when logprobs were asked for (None: not asked).
        self.top = top
        self.id = new_id(kind)
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def _choice(self, text: str | None, finish: str | None, role: bool = False,
                index: int = 0, tokens: Sequence[TokenLogprob] = (),
                offset: int = 0, calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        shown = logprobs(self.kind, tokens, self.top, offset) if self.top is not None and (
            tokens) else None
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                # A first chunk that opens a call has no content (OpenAI's null).
                delta["content"] = None if calls and not text and role else text
            if calls:
                if not text and not role:
                    delta.pop("content", None)
                delta["tool_calls"] = [c.openai() for c in calls]
            return {"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": shown, "finish_reason": finish}

    def first(self, text: str, index: int = 0, tokens: Sequence[TokenLogprob] = (),
              calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        """The first chunk (of a choice); in a chat it carries the role."""
        return self._chunk([self._choice(text, None, role=True, index=index, tokens=tokens,
                                         calls=calls)])

    def text(self, text: str, index: int = 0, tokens: Sequence[TokenLogprob] = (),
             offset: int = 0, calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        """More text of a choice; `offset`: its characters sent before."""
        return self._chunk([self._choice(text, None, index=index, tokens=tokens,
                                         offset=offset, calls=calls)])

    def last(self, result: Generation, index: int = 0) -> dict[str, Any]:
        """The chunk with the finish reason (and no new text)."""
        finish = FINISH.get(result.finish_reason, "stop")
        out = self._chunk([self._choice(None if self.kind == "chat" else "", finish,
                                        index=index)])
        if result.resumes:
            # The mesh's own field: the stream continued on another replica.
            out["resumes"] = result.resumes
        return out

    def usage(self, result: Generation | Sequence[Generation]) -> dict[str, Any]:
        """The extra chunk of `stream_options.include_usage`: no choices."""
        out = self._chunk([])
        out["usage"] = usage(result)
        return out


def model(info: ModelInfo, created: int) -> dict[str, Any]:
    """OpenAI's model object, with the mesh's facts as extra fields."""
    return {
        "id": info.id,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "name": info.name,
        "aliases": list(info.aliases),
        "backend_model": info.engine_model,
        "max_input_tokens": info.limits.max_input_tokens,
        "max_total_tokens": info.limits.max_total_tokens,
        "max_new_tokens": info.limits.max_new_tokens,
        "ready": info.ready,
        "replicas": info.replicas,
        "ready_replicas": info.ready_replicas,
    }


def model_list(infos: list[ModelInfo], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model(i, created) for i in infos]}
