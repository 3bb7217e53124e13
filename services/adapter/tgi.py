"""The TGI backend: Text Generation Inference's HTTP API, through the
`text-generation` client's request types and error parser.

The client's own `AsyncClient` opens a new HTTP session per call and applies
a fixed total timeout, so the adapter keeps one long-lived aiohttp session
per backend, posts the client's `Request` to TGI's `/` route exactly as the
client does, and derives each call's timeout from the gRPC deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from text_generation import errors as tgi_errors
from text_generation.types import Grammar as TGIGrammar
from text_generation.types import GrammarType as TGIGrammarType
from text_generation.types import Parameters as TGIParameters
from text_generation.types import Request as TGIRequest

from services.adapter.backend import BackendInfo, BackendResult, BackendToken, Prompt
from services.adapter.http_engine import json_or_text, transport_error
from services.common import tracing
from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.types import FinishReason, Grammar, Parameters

# TGI's errors -> the mesh's reasons. The `text-generation` client turns TGI's
# status and `error_type` into these exception classes (errors.parse_error);
# the reason then decides the gRPC code through services.common.errors.TABLE.
TGI_ERRORS: Mapping[type[Exception], Reason] = {
    tgi_errors.ValidationError: Reason.INVALID_ARGUMENT,  # 422 validation
    tgi_errors.BadRequestError: Reason.INVALID_ARGUMENT,  # 400
    tgi_errors.OverloadedError: Reason.OVERLOADED,  # 429 overloaded
    tgi_errors.RateLimitExceededError: Reason.OVERLOADED,  # 429 without error_type
    tgi_errors.GenerationError: Reason.MODEL_ERROR,  # 424 generation
    tgi_errors.IncompleteGenerationError: Reason.INCOMPLETE_GENERATION,  # 500 incomplete
    tgi_errors.ShardNotReadyError: Reason.BACKEND_UNAVAILABLE,  # 403/424 shard not ready
    tgi_errors.ShardTimeoutError: Reason.TIMEOUT,  # 504
    tgi_errors.NotFoundError: Reason.BACKEND_UNAVAILABLE,  # 404: not a TGI at that URL
    tgi_errors.UnknownError: Reason.MODEL_ERROR,  # anything else TGI says
}

_FINISH = {
    "length": FinishReason.LENGTH,
    "eos_token": FinishReason.EOS_TOKEN,
    "stop_sequence": FinishReason.STOP_SEQUENCE,
}


def error_from_tgi(status: int, payload: Any) -> MeshError:
    """One TGI error reply (or in-band stream error) as a MeshError."""
    if not isinstance(payload, dict) or "error" not in payload:
        payload = {"error": f"backend replied {status}: {str(payload)[:200]}"}
    exc = tgi_errors.parse_error(status, payload)
    reason = TGI_ERRORS.get(type(exc), Reason.MODEL_ERROR)
    metadata = {"backend_status": str(status)}
    if "error_type" in payload:
        metadata["backend_error_type"] = str(payload["error_type"])
    return MeshError(reason, str(payload["error"]), metadata=metadata)


def _timeout(seconds: float | None, connect: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds, sock_connect=connect)


class TGIBackend:
    """One TGI server, reached over one pooled HTTP session."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 2.0,
        max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=60, force_close=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=json.dumps,
                auto_decompress=False,
                # Sends `traceparent` to the engine while tracing is on.
                trace_configs=tracing.http_client_tracing(),
            )
        return self._session

    @property
    def applies_template(self) -> bool:
        return False  # TGI's /generate applies no template: the adapter renders it

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, prompt: str, params: Parameters, stream: bool) -> dict[str, Any]:
        if params.presence_penalty:
            # TGI's /generate has frequency_penalty but no presence_penalty.
            raise invalid([FieldViolation(
                "parameters.presence_penalty", "not supported by this model's engine (TGI)")])
        parameters = TGIParameters(
            details=True,
            do_sample=params.sampling,
            max_new_tokens=params.max_new_tokens or 20,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            stop=list(params.stop),
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            grammar=_grammar(params.grammar),
        )
        body = TGIRequest(inputs=prompt, parameters=parameters, stream=stream).model_dump()
        if params.frequency_penalty:
            # Set after the client's model: its check predates TGI's -2..2 range.
            body["parameters"]["frequency_penalty"] = params.frequency_penalty
        return body

    def body(self, prompt: Prompt, params: Parameters, stream: bool) -> dict[str, Any]:
        """The JSON body the `text-generation` client would send."""
        if not isinstance(prompt, str):
            raise TypeError("TGI takes a rendered prompt, not a conversation")
        try:
            return self._body(prompt, params, stream)
        except ValueError as exc:  # the client's own checks (pydantic)
            raise MeshError(Reason.INVALID_ARGUMENT, f"invalid parameters: {exc}") from exc

    async def generate(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> BackendResult:
        body = self.body(prompt, params, stream=False)
        try:
            async with self.session.post(
                f"{self.base_url}/",
                json=body,
                timeout=_timeout(timeout, self._connect_timeout),
            ) as resp:
                payload = await resp.json(content_type=None)
                if resp.status != 200:
                    raise error_from_tgi(resp.status, payload)
                reply = payload[0] if isinstance(payload, list) else payload
                details = reply.get("details") or {}
                return BackendResult(
                    text=reply["generated_text"],
                    generated_tokens=int(
                        details.get("generated_tokens")
                        or resp.headers.get("x-generated-tokens")
                        or 0
                    ),
                    input_tokens=int(resp.headers.get("x-prompt-tokens", 0)),
                    finish_reason=_FINISH.get(
                        details.get("finish_reason", ""), FinishReason.UNSPECIFIED
                    ),
                )
        except (MeshError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise transport_error(exc, self.base_url, "TGI") from exc

    async def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[BackendToken | BackendResult]:
        """Yield each token, then the final result.

        On cancellation the response is closed without being read to the end,
        which closes the TCP connection, and TGI drops the request.
        """
        body = self.body(prompt, params, stream=True)
        resp: aiohttp.ClientResponse | None = None
        finished = False
        try:
            resp = await self.session.post(
                f"{self.base_url}/",
                json=body,
                timeout=_timeout(timeout, self._connect_timeout),
            )
            if resp.status != 200:
                payload = await json_or_text(resp)
                raise error_from_tgi(resp.status, payload)
            events = _SSEParser()
            while not finished:
                # Everything that has arrived goes out as one chunk: one message
                # per token when the backend is slow, fewer when the reader lags.
                data = await resp.content.readany()
                if not data:
                    break
                texts: list[str] = []
                result: BackendResult | None = None
                for event in events.feed(data):
                    if "error" in event:
                        if texts:
                            yield BackendToken("".join(texts), len(texts))
                        raise error_from_tgi(200, event)
                    token = event.get("token") or {}
                    texts.append("" if token.get("special") else token.get("text", ""))
                    if event.get("generated_text") is not None:
                        details = event.get("details") or {}
                        result = BackendResult(
                            text=event["generated_text"],
                            generated_tokens=int(details.get("generated_tokens", 0)),
                            input_tokens=int(details.get("input_length", 0)),
                            finish_reason=_FINISH.get(
                                details.get("finish_reason", ""), FinishReason.UNSPECIFIED
                            ),
                        )
                        break
                if texts:
                    yield BackendToken("".join(texts), len(texts))
                if result is not None:
                    finished = True
                    yield result
                    return
            raise MeshError(
                Reason.INCOMPLETE_GENERATION,
                "the backend closed the stream before its final event",
            )
        except (MeshError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise transport_error(exc, self.base_url, "TGI") from exc
        finally:
            if resp is not None:
                if finished:
                    resp.release()
                else:
                    resp.close()  # drop the connection: TGI stops generating

    async def health(self, timeout: float = 2.0) -> bool:
        try:
            async with self.session.get(
                f"{self.base_url}/health", timeout=_timeout(timeout, self._connect_timeout)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def info(self, timeout: float = 2.0) -> BackendInfo:
        try:
            async with self.session.get(
                f"{self.base_url}/info", timeout=_timeout(timeout, self._connect_timeout)
            ) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise transport_error(exc, self.base_url, "TGI") from exc
        return BackendInfo(
            model_id=str(data.get("model_id", "")),
            # Releases before v2 called it max_input_length.
            max_input_tokens=int(
                data.get("max_input_tokens") or data.get("max_input_length") or 0
            ),
            max_total_tokens=int(data.get("max_total_tokens") or 0),
            max_stop_sequences=int(data.get("max_stop_sequences") or 4),
            max_concurrent_requests=int(data.get("max_concurrent_requests") or 128),
        )


def _grammar(grammar: Grammar | None) -> TGIGrammar | None:
    """The mesh's grammar as TGI's `grammar` parameter."""
    if grammar is None:
        return None
    if grammar.kind == "json":
        return TGIGrammar(type=TGIGrammarType.Json, value=grammar.schema())
    return TGIGrammar(type=TGIGrammarType.Regex, value=grammar.value)


class _SSEParser:
    """TGI's Server-Sent Events: `data:{json}` lines; anything else is framing."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for more
        return [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]



