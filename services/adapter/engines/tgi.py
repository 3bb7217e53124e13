"""The TGI driver: Text Generation Inference's HTTP API.

Requests go to TGI's compat route `POST /` (`{"inputs", "parameters",
"stream"}`), the route the `text-generation` client posts to, built from
the parameter table's TGI spellings as plain JSON. Errors are read as that
client reads them (its `errors.parse_error`): TGI's `error_type` first,
then the HTTP status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from services.adapter.engines.base import EngineInfo, EngineResult, EngineToken, Prompt
from services.adapter.engines.http import HttpEngine, KeepAlivePool, SSEParser, json_or_text
from services.adapter.tool_calls.types import ToolChoice
from services.common import tracing
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.parameters import PARAMS
from services.common.types import FinishReason, Grammar, Parameters, TokenLogprob

# TGI's `error_type` -> the mesh's reason; the reason then decides the gRPC
# code through services.common.errors.TABLE.
TGI_ERROR_TYPES: Mapping[str, Reason] = {
    "validation": Reason.INVALID_ARGUMENT,  # 422
    "overloaded": Reason.OVERLOADED,  # 429
    "generation": Reason.MODEL_ERROR,  # 424
    "incomplete_generation": Reason.INCOMPLETE_GENERATION,  # 500
}
# Without a known `error_type`, the HTTP status (as the Inference API answers).
TGI_ERROR_STATUS: Mapping[int, Reason] = {
    400: Reason.INVALID_ARGUMENT,
    403: Reason.BACKEND_UNAVAILABLE,  # shard not ready
    424: Reason.BACKEND_UNAVAILABLE,  # shard not ready
    504: Reason.TIMEOUT,  # shard timeout
    404: Reason.BACKEND_UNAVAILABLE,  # not a TGI at that URL
    429: Reason.OVERLOADED,  # rate limited
}

_FINISH = {
    "length": FinishReason.LENGTH,
    "eos_token": FinishReason.EOS_TOKEN,
    "stop_sequence": FinishReason.STOP_SEQUENCE,
}

# Parameter name -> TGI's field, for the parameters TGI takes; the others
# are refused when a request sets them.
_TGI_NAMES: Mapping[str, str] = {p.name: p.tgi for p in PARAMS if p.tgi is not None}
_REFUSED: tuple[str, ...] = tuple(p.name for p in PARAMS if p.tgi is None)
# Sent as the driver decides, not copied from the request.
_DERIVED = frozenset({"do_sample", "grammar", "frequency_penalty", "logprobs", "top_logprobs"})
# OpenAI's stand-in for a logprob of minus infinity (TGI sends null).
NO_LOGPROB = -9999.0
_COPIED: tuple[tuple[str, str], ...] = tuple(
    (name, field) for name, field in _TGI_NAMES.items() if name not in _DERIVED
)


def error_from_tgi(status: int, payload: Any) -> MeshError:
    """One TGI error reply (or in-band stream error) as a MeshError."""
    if not isinstance(payload, dict) or "error" not in payload:
        payload = {"error": f"the engine replied {status}: {str(payload)[:200]}"}
    error_type = payload.get("error_type")
    reason = TGI_ERROR_TYPES.get(error_type) if isinstance(error_type, str) else None
    if reason is None:
        reason = TGI_ERROR_STATUS.get(status, Reason.MODEL_ERROR)
    metadata = {"backend_status": str(status)}
    if "error_type" in payload:
        metadata["backend_error_type"] = str(error_type)
    return MeshError(reason, str(payload["error"]), metadata=metadata)


def _grammar(grammar: Grammar) -> dict[str, Any]:
    """The mesh's grammar as TGI's `grammar` parameter."""
    return {"type": grammar.kind, "value": grammar.value}


def _cached(details: Mapping[str, Any]) -> int:
    """Prompt tokens reused from the engine's prefix cache: `details.cached_tokens`
    (the CPU backend's; TGI itself reports none, so 0)."""
    try:
        return max(int(details.get("cached_tokens") or 0), 0)
    except (TypeError, ValueError):
        return 0


def _token(token: Mapping[str, Any]) -> TokenLogprob:
    text = str(token.get("text") or "")
    logprob = token.get("logprob")
    return TokenLogprob(
        token=text,
        logprob=float(logprob) if isinstance(logprob, int | float) else NO_LOGPROB,
        bytes=tuple(text.encode("utf-8")) if text else None,
    )


def token_logprob(token: Mapping[str, Any], top: Any) -> TokenLogprob | None:
    """One of TGI's generated tokens (and its `top_tokens`) as a TokenLogprob;
    None for a special token, which the text leaves out too."""
    if not isinstance(token, Mapping) or token.get("special"):
        return None
    alternatives = tuple(_token(t) for t in top if isinstance(t, Mapping)) if isinstance(
        top, list) else ()
    return replace(_token(token), top=alternatives)


def _logprobs(details: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
    """Every generated token's logprob from a unary reply's `details`."""
    tokens = details.get("tokens") or []
    tops = details.get("top_tokens") or []
    out = []
    for i, token in enumerate(tokens):
        entry = token_logprob(token, tops[i] if i < len(tops) else None)
        if entry is not None:
            out.append(entry)
    return tuple(out)


def _result(
    status: int, headers: Mapping[str, str], payload: Any, logprobs: bool = False
) -> EngineResult:
    """A whole generation from TGI's reply (the compat route answers a list)."""
    if status != 200:
        raise error_from_tgi(status, payload)
    reply = payload[0] if isinstance(payload, list) else payload
    details = reply.get("details") or {}
    return EngineResult(
        text=reply["generated_text"],
        generated_tokens=int(
            details.get("generated_tokens") or headers.get("x-generated-tokens") or 0
        ),
        input_tokens=int(headers.get("x-prompt-tokens", 0)),
        finish_reason=_FINISH.get(details.get("finish_reason", ""), FinishReason.UNSPECIFIED),
        logprobs=_logprobs(details) if logprobs else (),
        cached_input_tokens=_cached(details),
    )


class TGIEngine(HttpEngine):
    """One TGI server: generations over kept-alive connections of their own,
    streams, health and limits over one pooled HTTP session."""

    api = "TGI"

    def __init__(
        self, base_url: str, *, connect_timeout: float = 2.0, max_connections: int = 256
    ) -> None:
        super().__init__(base_url, connect_timeout=connect_timeout,
                         max_connections=max_connections)
        self._pool = (
            KeepAlivePool(self.base_url, connect_timeout=connect_timeout,
                          max_connections=max_connections)
            if self.base_url.startswith("http://") else None
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        await super().close()

    @property
    def applies_template(self) -> bool:
        return False  # TGI's /generate applies no template: the adapter renders it

    def native_tools(self, choice: ToolChoice) -> bool:
        return False  # the adapter renders tools and reads calls out of the text

    def body(self, prompt: Prompt, params: Parameters, stream: bool) -> dict[str, Any]:
        """The JSON body of a generation."""
        if not isinstance(prompt, str):
            raise TypeError("TGI takes a rendered prompt, not a conversation")
        refused = [name for name in _REFUSED if getattr(params, name)]
        if refused:
            raise invalid([
                FieldViolation(f"parameters.{name}", "not supported by this model's engine (TGI)")
                for name in refused
            ])
        # TGI's `/` route returns the prompt with the text unless told not to.
        parameters: dict[str, Any] = {
            "details": True, "do_sample": params.sampling, "return_full_text": False,
        }
        for name, field in _COPIED:
            value = getattr(params, name)
            if value is not None:
                parameters[field] = list(value) if isinstance(value, tuple) else value
        if params.grammar is not None:
            parameters["grammar"] = _grammar(params.grammar)
        if params.frequency_penalty:
            parameters["frequency_penalty"] = params.frequency_penalty
        if params.top_logprobs:
            parameters["top_n_tokens"] = params.top_logprobs
        return {"inputs": prompt, "parameters": parameters, "stream": stream}

    async def count_tokens(self, prompt: str, timeout: float | None) -> int:
        """The prompt's tokens by TGI's own tokenizer (`POST /tokenize`, which
        the CPU backend serves too): what TGI counts as the input."""
        with self.engine_errors():
            async with self.post_json(f"{self.base_url}/tokenize", {"inputs": prompt},
                                      timeout) as resp:
                payload = json.loads(await resp.read())
                if resp.status != 200 or not isinstance(payload, list):
                    raise error_from_tgi(resp.status, payload)
                return len(payload)

    async def generate(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> EngineResult:
        body = self.body(prompt, params, stream=False)
        with self.engine_errors():
            if self._pool is not None and not tracing.enabled():
                reply = await self._pool.post_json("/", body, timeout)
                return _result(reply.status, reply.headers, json.loads(reply.body),
                               params.wants_logprobs)
            # Through the session while tracing is on: it sends `traceparent`.
            async with self.post_json(f"{self.base_url}/", body, timeout) as resp:
                return _result(resp.status, resp.headers, json.loads(await resp.read()),
                               params.wants_logprobs)

    async def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[EngineToken | EngineResult]:
        """Yield each token, then the final result.

        On cancellation the response is closed without being read to the end,
        which closes the TCP connection, and TGI drops the request.
        """
        body = self.body(prompt, params, stream=True)
        want_logprobs = params.wants_logprobs
        resp: aiohttp.ClientResponse | None = None
        finished = False
        try:
            resp = await self.post_json(f"{self.base_url}/", body, timeout)
            if resp.status != 200:
                payload = await json_or_text(resp)
                raise error_from_tgi(resp.status, payload)
            events = SSEParser()
            while not finished:
                # Everything that has arrived goes out as one chunk: one message
                # per token when the engine is slow, fewer when the reader lags.
                data = await resp.content.readany()
                if not data:
                    break
                texts: list[str] = []
                logprobs: list[TokenLogprob] = []
                result: EngineResult | None = None
                for event in events.feed(data):
                    if "error" in event:
                        if texts:
                            yield EngineToken("".join(texts), len(texts), tuple(logprobs))
                        raise error_from_tgi(200, event)
                    token = event.get("token") or {}
                    texts.append("" if token.get("special") else token.get("text", ""))
                    if want_logprobs:
                        entry = token_logprob(token, event.get("top_tokens"))
                        if entry is not None:
                            logprobs.append(entry)
                    if event.get("generated_text") is not None:
                        details = event.get("details") or {}
                        result = EngineResult(
                            text=event["generated_text"],
                            generated_tokens=int(details.get("generated_tokens", 0)),
                            input_tokens=int(details.get("input_length", 0)),
                            finish_reason=_FINISH.get(
                                details.get("finish_reason", ""), FinishReason.UNSPECIFIED
                            ),
                            cached_input_tokens=_cached(details),
                        )
                        break
                if texts:
                    yield EngineToken("".join(texts), len(texts), tuple(logprobs))
                if result is not None:
                    finished = True
                    yield result
                    return
            raise MeshError(
                Reason.INCOMPLETE_GENERATION,
                "the engine closed the stream before its final event",
            )
        except (MeshError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self.transport_error(exc) from exc
        finally:
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # drop the connection: TGI stops generating

    async def health(self, timeout: float = 2.0) -> bool:
        try:
            async with self.session.get(
                f"{self.base_url}/health", timeout=self.timeout(timeout)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def info(self, timeout: float = 2.0) -> EngineInfo:
        try:
            async with self.session.get(
                f"{self.base_url}/info", timeout=self.timeout(timeout)
            ) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise self.transport_error(exc) from exc
        return EngineInfo(
            model_id=str(data.get("model_id", "")),
            # Releases before v2 called it max_input_length.
            max_input_tokens=int(
                data.get("max_input_tokens") or data.get("max_input_length") or 0
            ),
            max_total_tokens=int(data.get("max_total_tokens") or 0),
            max_stop_sequences=int(data.get("max_stop_sequences") or 4),
            max_concurrent_requests=int(data.get("max_concurrent_requests") or 128),
        )
