"""OpenAI's response shapes, built from the mesh's domain types.

Chat: `chat.completion` and, streamed, `chat.completion.chunk` objects;
completions: `text_completion` (streamed as the same object, as OpenAI
does); models: `list` and `model`. The llmmesh facts of a model ride along
as extra fields, which OpenAI's SDKs keep.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from services.adapter.tool_calls.types import ToolCallDelta
from services.common.types import FinishReason, Generation, ModelInfo
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


def usage(result: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.tokens,
        "total_tokens": result.input_tokens + result.tokens,
    }


def completion(kind: Kind, result: Generation, *, id: str, created: int,
               text: str | None = None) -> dict[str, Any]:
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
    return {
        "id": id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": result.model_id,
        "choices": [choice],
        "usage": usage(result),
    }


class ChunkShapes:
    """The events of one stream: same id, model and time on every chunk."""

    def __init__(self, kind: Kind, model: str, include_usage: bool) -> None:
        self.kind = kind
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
                calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                # A first chunk that opens a call has no content (OpenAI's null).
                delta["content"] = None if calls and not text and role else text
            if calls:
                if not text and not role:
                    del delta["content"]
                delta["tool_calls"] = [c.openai() for c in calls]
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def first(self, text: str, calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        """The first chunk; in a chat it carries the role."""
        return self._chunk([self._choice(text, None, role=True, calls=calls)])

    def text(self, text: str, calls: tuple[ToolCallDelta, ...] = ()) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, calls=calls)])

    def last(self, result: Generation) -> dict[str, Any]:
        """The chunk with the finish reason (and no new text)."""
        finish = FINISH.get(result.finish_reason, "stop")
        return self._chunk([self._choice(None if self.kind == "chat" else "", finish)])

    def usage(self, result: Generation) -> dict[str, Any]:
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
