"""How to send: one streamed generation over each API, timed as it arrives.

Every client fills a `Record` while the stream comes in: when the first
content arrived, when each chunk arrived and how many tokens it carried, how
many tokens the server counted, and, for a failure, one short reason label
(`http 429 OVERLOADED`, `grpc UNAVAILABLE BACKEND_UNAVAILABLE`,
`in-band UNAVAILABLE INCOMPLETE_GENERATION`, `timeout`, ...). A stream
counts as a success only when it ended with a finish reason and no error.

- `http`: llmmesh's `POST /v1/generate_stream` (Server-Sent Events through
  Envoy); the events carry the running token count.
- `grpc`: llmmesh.v1 `GenerateService/GenerateStream`, same fields.
An `https://` URL means TLS for every API (gRPC too), checked against
`--ca-file` or the system's CAs.
- `openai`: `POST /v1/chat/completions` with `stream: true` and
  `stream_options: {include_usage: true}`; token counts from `usage`.
"""

from __future__ import annotations

import itertools
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tools.loadtest.workload import Item

_FINISHED = {"FINISH_REASON_LENGTH", "FINISH_REASON_EOS_TOKEN", "FINISH_REASON_STOP_SEQUENCE"}


@dataclass
class Record:
    """One request as the client saw it. Times are seconds (time.perf_counter)."""

    model: str
    start: float
    end: float = 0.0
    error: str | None = None
    rate_limited: bool = False  # HTTP 429 or RESOURCE_EXHAUSTED
    first: float | None = None  # the first chunk with content
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)
    output_tokens: int = 0
    input_tokens: int | None = None
    finish_reason: str | None = None
    turn: int | None = None  # the turn of its conversation (shared-prefix workload)

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        if self.first is None or self.output_tokens < 2:
            return None
        return (self.end - self.first) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        """Gaps between successive chunks (a chunk may carry several tokens)."""
        times = [t for t, _ in self.chunks]
        return [b - a for a, b in itertools.pairwise(times)]

    def chunk(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.chunks.append((now, tokens))

    def fail(self, reason: str, *, rate_limited: bool = False) -> None:
        if self.error is None:
            self.error = reason
            self.rate_limited = rate_limited


class Client(Protocol):
    name: str

    async def run(self, item: Item, record: Record) -> None:
        """Send `item` and fill `record` as the reply arrives (sets `end` when done)."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    url: str  # http://host:8000, or https://
    grpc_target: str  # host:8000
    api_key: str | None = None
    temperature: float | None = None
    ca_file: str | None = None  # the CA of a TLS deployment (default: the system's)

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None


def _headers(target: Target) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


def _session(target: Target, concurrency_hint: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max(16, concurrency_hint), keepalive_timeout=60,
                                     ssl=target.ssl_context() or True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def _refused(resp: aiohttp.ClientResponse, record: Record) -> bool:
    """Record a reply other than 200 as a failure (a 429 as rate-limited)."""
    if resp.status == 200:
        return False
    record.fail(_http_error(resp.status, await resp.read()), rate_limited=resp.status == 429)
    record.end = time.perf_counter()
    return True


def _http_error(status: int, raw: bytes) -> str:
    """`http STATUS REASON` from llmmesh's or OpenAI's error body, else `http STATUS`."""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"http {status}"
    reason = None
    if isinstance(body, dict):
        for detail in body.get("details") or []:  # llmmesh: google.rpc.ErrorInfo
            if isinstance(detail, dict) and detail.get("reason"):
                reason = detail["reason"]
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI
            reason = error.get("code") or error.get("type")
    return f"http {status} {reason}" if reason else f"http {status}"


# An in-stream OpenAI error that stands for HTTP 429: OpenAI's `type`, or a
# `code` that names it (llmmesh puts its reason label there: `overloaded`).
RATE_LIMIT_CODES = frozenset({"overloaded", "rate_limit_exceeded", "rate_limit", "429"})


def _rate_limited(error: dict[str, Any]) -> bool:
    return (error.get("type") == "rate_limit_error"
            or str(error.get("code") or "").lower() in RATE_LIMIT_CODES)


class NativeHTTPClient:
    """llmmesh's HTTP API: `POST /v1/generate_stream`, SSE."""

    name = "http"

    def __init__(self, target: Target, concurrency_hint: int = 64) -> None:
        self.target = target
        self.url = f"{target.url.rstrip('/')}/v1/generate_stream"
        self.headers = _headers(target)
        self.session = _session(target, concurrency_hint)

    def body(self, item: Item) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": item.max_tokens}
        if self.target.temperature is not None:
            params["temperature"] = self.target.temperature
        body: dict[str, Any] = {"model_id": item.model, "parameters": params}
        if item.messages:
            body["messages"] = item.chat()
        else:
            body["inputs"] = item.prompt
        if item.scenario:
            body["scenario"] = item.scenario
        return body

    async def run(self, item: Item, record: Record) -> None:
        async with self.session.post(self.url, json=self.body(item),
                                     headers=self.headers) as resp:
            if await _refused(resp, record):
                return
            seen = 0
            done = False
            # Read to the end of the body, as any client does: leaving after the
            # last event would close the connection and cancel the stream upstream.
            async for line in resp.content:
                if done or not line.startswith(b"data:"):
                    continue
                done = _native_event(json.loads(line[5:]), record, seen)
                seen = record.output_tokens
        record.end = time.perf_counter()
        if record.finish_reason is None:
            record.fail("incomplete: the stream ended without a finish reason")

    async def close(self) -> None:
        await self.session.close()


def _native_event(event: dict[str, Any], record: Record, seen: int) -> bool:
    """Apply one stream event (HTTP JSON or gRPC as a dict); True at the last."""
    tokens = int(event.get("tokens") or 0)
    if tokens > seen:
        record.chunk(tokens - seen)
        record.output_tokens = tokens
    error = event.get("error")
    if error:
        code = error.get("code", "")
        record.fail(f"in-band {code} {error.get('reason', '')}".strip(),
                    rate_limited=code == "RESOURCE_EXHAUSTED")
        return True
    finish = event.get("finish_reason") or "FINISH_REASON_UNSPECIFIED"
    if finish == "FINISH_REASON_UNSPECIFIED":
        return False
    if finish not in _FINISHED:
        record.fail(f"in-band {finish}")
        return True
    record.finish_reason = finish
    if event.get("input_tokens"):
        record.input_tokens = int(event["input_tokens"])
    return True


class GRPCClient:
    """llmmesh's gRPC API: `llmmesh.v1.GenerateService/GenerateStream`."""

    name = "grpc"

    def __init__(self, target: Target) -> None:
        self.target = target
        options = [("grpc.max_concurrent_streams", 10_000)]
        if target.tls:
            roots = Path(target.ca_file).read_bytes() if target.ca_file else None
            self.channel = grpc.aio.secure_channel(
                target.grpc_target, grpc.ssl_channel_credentials(root_certificates=roots),
                options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target.grpc_target, options=options)
        self.stub = pb_grpc.GenerateServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {target.api_key}"),) if target.api_key else ()

    async def run(self, item: Item, record: Record) -> None:
        params = pb.GenerationParameters(max_new_tokens=item.max_tokens)
        if self.target.temperature is not None:
            params.temperature = self.target.temperature
        request = pb.GenerateStreamRequest(model_id=item.model or "",
                                           scenario=item.scenario or "", parameters=params)
        if item.messages:
            request.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                                    for m in item.chat())
        else:
            request.inputs = item.prompt
        seen = 0
        done = False
        try:
            # To the end of the call, so that it is never cancelled from this side.
            async for reply in self.stub.GenerateStream(request, metadata=self.metadata):
                if done:
                    continue
                event = {"tokens": reply.tokens, "input_tokens": reply.input_tokens,
                         "finish_reason": pb.FinishReason.Name(reply.finish_reason)}
                if reply.HasField("error"):
                    event["error"] = {"code": reply.error.code, "reason": reply.error.reason}
                done = _native_event(event, record, seen)
                seen = record.output_tokens
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            reason = _grpc_reason(err)
            record.fail(f"grpc {code} {reason}".strip(),
                        rate_limited=err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        record.end = time.perf_counter()
        if record.finish_reason is None:
            record.fail("incomplete: the stream ended without a finish reason")

    async def close(self) -> None:
        await self.channel.close()


def _grpc_reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a rich gRPC status, or ''."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


class OpenAIClient:
    """The OpenAI-compatible API: `POST /v1/chat/completions`, streamed, with usage."""

    name = "openai"

    def __init__(self, target: Target, concurrency_hint: int = 64) -> None:
        self.target = target
        base = target.url.rstrip("/")
        self.url = f"{base if base.endswith('/v1') else base + '/v1'}/chat/completions"
        self.headers = _headers(target)
        self.session = _session(target, concurrency_hint)

    def body(self, item: Item) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": item.model, "messages": item.chat(),
            "max_tokens": item.max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.target.temperature is not None:
            body["temperature"] = self.target.temperature
        return body

    async def run(self, item: Item, record: Record) -> None:
        async with self.session.post(self.url, json=self.body(item),
                                     headers=self.headers) as resp:
            if await _refused(resp, record):
                return
            chunks = 0
            usage: dict[str, Any] | None = None
            done = False
            async for line in resp.content:  # to the end of the body (see NativeHTTPClient)
                if done or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if event.get("error"):
                    error = event["error"]
                    code = error.get("code") or error.get("type") or "error"
                    record.fail(f"in-band {code}", rate_limited=_rate_limited(error))
                    done = True
                    continue
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        record.chunk(1)
                        chunks += 1
                    if choice.get("finish_reason"):
                        record.finish_reason = str(choice["finish_reason"])
                if event.get("usage"):
                    usage = event["usage"]
        record.end = time.perf_counter()
        record.output_tokens = int(usage["completion_tokens"]) if usage else chunks
        if usage and usage.get("prompt_tokens") is not None:
            record.input_tokens = int(usage["prompt_tokens"])
        if record.error is None and record.finish_reason is None:
            record.fail("incomplete: the stream ended without a finish reason")

    async def close(self) -> None:
        await self.session.close()


APIS = ("http", "grpc", "openai")


def make_client(api: str, target: Target, concurrency_hint: int = 64) -> Client:
    if api == "http":
        return NativeHTTPClient(target, concurrency_hint)
    if api == "grpc":
        return GRPCClient(target)
    if api == "openai":
        return OpenAIClient(target, concurrency_hint)
    raise ValueError(f"api must be one of {APIS}")
