"""What every HTTP engine driver shares: one pooled session per engine,
per-call timeouts from the caller's deadline, JSON bodies sent as bytes,
Server-Sent Events parsing, and transport failures as the error table's
reasons."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from services.common import tracing
from services.common.errors import MeshError, Reason

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}


class HttpEngine:
    """One engine at `base_url`, reached over one long-lived session.

    A driver's own `api` ("TGI", "OpenAI") names the API in its errors.
    """

    api = "HTTP"

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 2.0,
        max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # Timeouts by deadline: most calls carry the same few.
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                auto_decompress=False,
                # Sends `traceparent` to the engine while tracing is on.
                trace_configs=tracing.http_client_tracing(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        """The whole call within `seconds` (None: no bound), connecting within
        the connect timeout."""
        cached = self._timeouts.get(seconds)
        if cached is None:
            cached = aiohttp.ClientTimeout(total=seconds, sock_connect=self._connect_timeout)
            if len(self._timeouts) < 64:
                self._timeouts[seconds] = cached
        return cached

    def post_json(
        self, url: str, body: Mapping[str, Any], timeout: float | None
    ) -> Any:
        """POST `body` as JSON (the request context manager of aiohttp)."""
        return self.session.post(
            url, data=json.dumps(body).encode(), headers=JSON_HEADERS,
            timeout=self.timeout(timeout),
        )

    def transport_error(self, exc: BaseException) -> MeshError:
        return transport_error(exc, self.base_url, self.api)

    @contextlib.contextmanager
    def engine_errors(self) -> Iterator[None]:
        """A failure to talk to the engine raised as its reason in the error
        table; the mesh's own errors (and cancellation) pass as they are."""
        try:
            yield
        except MeshError:
            raise
        except Exception as exc:
            raise self.transport_error(exc) from exc


async def json_or_text(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def transport_error(exc: BaseException, url: str, api: str) -> MeshError:
    """The reason for a failure to talk to the engine at `url`, whose API is `api`
    ("TGI", "OpenAI")."""
    meta = {"backend": url}
    if isinstance(exc, TimeoutError):
        return MeshError(Reason.TIMEOUT, f"the engine at {url} did not answer in time",
                         metadata=meta)
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return MeshError(Reason.BACKEND_UNAVAILABLE, f"cannot connect to the engine at {url}",
                         metadata=meta)
    if isinstance(
        exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError | ConnectionError
    ):
        return MeshError(Reason.INCOMPLETE_GENERATION,
                         f"the engine at {url} dropped the connection", metadata=meta)
    if isinstance(exc, ValueError | KeyError | TypeError):
        return MeshError(Reason.MODEL_ERROR,
                         f"the engine at {url} sent a reply that is not {api}'s", metadata=meta)
    return MeshError(Reason.BACKEND_UNAVAILABLE,
                     f"the engine at {url} failed: {exc.__class__.__name__}", metadata=meta)


class Reply:
    """A whole HTTP reply: status, headers (names lower-cased) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class KeepAlivePool:
    """HTTP/1.1 keep-alive connections to one engine, for unary JSON calls.

    A generation's request and reply are one small JSON document each: a
    plain exchange on a kept-alive connection costs a third of a general
    client's request (aiohttp's), which is most of what the adapter spends
    per call. A connection goes back to the pool only after a complete
    reply; any failure or cancellation closes it, which tells the engine to
    drop the request. Streams, health and tracing stay on the session.
    """

    def __init__(self, base_url: str, *, connect_timeout: float, max_connections: int) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"not a plain http:// URL: {base_url}")
        self._host = url.hostname
        self._port = url.port or 80
        self._prefix = url.path.rstrip("/")
        self._host_header = url.netloc.encode("latin-1")
        self._connect_timeout = connect_timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._connect_timeout)
        except TimeoutError:
            raise
        except OSError as exc:  # refused, unreachable, unknown host
            raise ConnectionRefusedError(str(exc)) from exc

    async def post_json(self, path: str, body: Mapping[str, Any], timeout: float | None) -> Reply:
        data = json.dumps(body).encode()
        head = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n"
                % ((self._prefix + path).encode(), self._host_header, len(data)))
        async with self._slots, asyncio.timeout(timeout):
            reader, writer = await self._connect()
            done = False
            try:
                writer.write(head + data)
                reply, reuse = await _read_reply(reader)
                done = reuse
                return reply
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("the engine closed the connection") from exc
            finally:
                if done:
                    self._idle.append((reader, writer))
                else:
                    writer.close()

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_reply(reader: asyncio.StreamReader) -> tuple[Reply, bool]:
    """One reply, and whether its connection can carry another request."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:  # the body runs to the end of the connection
        return Reply(status, headers, await reader.read()), False
    keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    return Reply(status, headers, body), keep


# An event that ends a stream without data (OpenAI's `data: [DONE]`).
DONE: dict[str, Any] = {}


class SSEParser:
    """Server-Sent Events: `data:{json}` lines (with or without a space);
    comments, other fields and blank lines are framing. OpenAI's
    `data: [DONE]` comes out as DONE."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for more
        out: list[dict[str, Any]] = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            value = line[5:].strip()
            if value == b"[DONE]":
                out.append(DONE)
            elif value:
                out.append(json.loads(value))
        return out
