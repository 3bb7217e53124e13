"""A lean, zero-delay TGI double for benchmarks: costs the mesh's load next to nothing.

    python -m tools.lean_tgi_double --port 8090 [--model-id NAME] [--host 127.0.0.1]

`tools.tgi_double` serves TGI's HTTP layer through aiohttp, which is
right for behaviour tests and wrong for a benchmark: aiohttp spends about a
millisecond of CPU on every request, on the same cores as the mesh it is
measuring. This double is a raw asyncio protocol (on uvloop) that answers the
routes the adapter calls with TGI's shapes and nothing else.

Shapes follow TGI's HTTP contract (router/src/server.rs, v3.3.x):
- `GET /health` 200, empty body; `GET /info` the v3 fields the adapter reads;
- `POST /generate` one GenerateResponse object; `POST /` (the compat route the
  `text-generation` client posts to) a JSON array holding one, or with
  `"stream": true` the same Server-Sent Events as `POST /generate_stream`:
  `data:{json}` with no space, a blank line after each event, the last event
  carrying `generated_text` and `details`; no `[DONE]`;
- headers `x-prompt-tokens` and `x-generated-tokens`;
- a body that is not a JSON object with a non-empty `inputs`: 422
  `{"error": "Input validation error: ...", "error_type": "validation"}`.

The reply is `max_new_tokens` tokens (` w0 w1 w2 ...`, finish reason
`length`), or fewer then an EOS token when `/_control` set `reply_tokens`.
The prompt counts one token per word. `POST /_control {"token_delay": s,
"reply_tokens": n}` slows every token down (held-stream benchmarks); `{}`
or `POST /_reset` goes back to zero delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from dataclasses import dataclass
from typing import Any

MAX_TOTAL_TOKENS = 4096


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
_REASONS = {200: "OK", 404: "Not Found", 411: "Length Required", 413: "Payload Too Large",
            422: "Unprocessable Entity"}


@dataclass
class Control:
    token_delay: float = 0.0
    reply_tokens: int | None = None


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    model_id: str
    max_concurrent_requests: int


def _response(status: int, body: bytes, content_type: str = "application/json",
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def _validation(message: str) -> bytes:
    body = _dumps({"error": f"Input validation error: {message}",
                       "error_type": "validation"}).encode()
    return _response(422, body)


def _token(i: int) -> dict[str, Any]:
    return {"id": i + 3, "text": f" w{i}" if i else f"w{i}", "logprob": -0.5, "special": False}


class Generation:
    """What one request asks for and what the double answers with."""

    def __init__(self, body: dict[str, Any], control: Control) -> None:
        params = body.get("parameters") or {}
        self.max_new = int(params.get("max_new_tokens") or 20)
        self.with_details = bool(params.get("details"))
        self.input_tokens = len(str(body["inputs"]).split())
        words = self.max_new if control.reply_tokens is None else control.reply_tokens
        self.words = min(words, self.max_new)
        self.eos = self.words < self.max_new
        self.text = " ".join(f"w{i}" for i in range(self.words))
        self.tokens = self.words + (1 if self.eos else 0)
        self.finish = "eos_token" if self.eos else "length"
        self.delay = control.token_delay

    def headers(self) -> str:
        return f"x-prompt-tokens: {self.input_tokens}\r\nx-generated-tokens: {self.tokens}\r\n"

    def details(self) -> dict[str, Any]:
        return {"finish_reason": self.finish, "generated_tokens": self.tokens, "seed": None,
                "input_length": self.input_tokens}

    def reply(self) -> dict[str, Any]:
        if not self.with_details:
            return {"generated_text": self.text}
        details = self.details()
        details["prefill"] = []
        details["tokens"] = [_token(i) for i in range(self.words)]
        return {"generated_text": self.text, "details": details}

    def events(self) -> list[bytes]:
        out = []
        for i in range(self.tokens):
            last = i == self.tokens - 1
            if i < self.words:
                token = _token(i)
            else:
                token = {"id": 0, "text": "</s>", "logprob": -0.1, "special": True}
            event = {"index": i + 1, "token": token, "top_tokens": None,
                     "generated_text": self.text if last else None,
                     "details": self.details() if last else None}
            out.append(b"data:" + _dumps(event).encode() + b"\n\n")
        return out


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: what the adapter and wrk send."""

    def __init__(self, settings: Settings, control: Control) -> None:
        self.settings = settings
        self.control = control
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a slow stream is being written; later requests wait in buffer
        self.close_after = False  # the client sent Connection: close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, path, _ = [*head[0].split(" "), "", ""][:3]
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", ""):
                self.transport.write(_response(411, b'{"error":"Content-Length required"}'))
                self.transport.close()
                return
            length = int(headers.get("content-length") or 0)
            if length > 2_000_000:
                self.transport.write(_response(413, b'{"error":"payload too large"}'))
                self.transport.close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.close_after = headers.get("connection", "").lower() == "close"
            self._handle(method, path.split("?", 1)[0], body)
            if not self.busy and self.close_after and self.transport is not None:
                self.transport.close()

    def _done(self) -> None:
        """A slow response is complete: close if the client asked to, else serve the next."""
        self.busy = False
        if self.transport is None:
            return
        if self.close_after:
            self.transport.close()
        else:
            self._serve()

    def _handle(self, method: str, path: str, raw: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path == "/health":
            self.transport.write(_response(200, b""))
        elif method == "GET" and path == "/info":
            self.transport.write(_response(200, _dumps(self._info()).encode()))
        elif method == "POST" and path in ("/_control", "/_reset"):
            try:
                data = json.loads(raw or b"{}") if path == "/_control" else {}
                self.control.token_delay = float(data.get("token_delay", 0.0))
                reply = data.get("reply_tokens")
                self.control.reply_tokens = None if reply is None else int(reply)
            except (ValueError, TypeError, AttributeError) as exc:
                self.transport.write(_response(400, _dumps({"error": str(exc)}).encode()))
                return
            self.transport.write(_response(200, b'{"ok":true}'))
        elif method == "POST" and path in ("/", "/generate", "/generate_stream"):
            try:
                body = json.loads(raw)
                if not isinstance(body, dict) or not str(body.get("inputs") or "").strip():
                    raise ValueError("`inputs` cannot be empty")
                gen = Generation(body, self.control)
            except (ValueError, TypeError) as exc:
                self.transport.write(_validation(str(exc)))
                return
            stream = path == "/generate_stream" or (path == "/" and body.get("stream") is True)
            if stream:
                self._stream(gen)
            elif gen.delay:
                self.busy = True
                asyncio.get_running_loop().create_task(self._slow_unary(gen, path == "/"))
            else:
                self._unary(gen, path == "/")
        else:
            self.transport.write(_response(404, b'{"error":"not found"}'))

    def _info(self) -> dict[str, Any]:
        s = self.settings
        return {"model_id": s.model_id, "model_sha": None, "model_pipeline_tag": None,
                "max_concurrent_requests": s.max_concurrent_requests, "max_best_of": 2,
                "max_stop_sequences": 4, "max_input_tokens": MAX_TOTAL_TOKENS - 1,
                "max_total_tokens": MAX_TOTAL_TOKENS, "validation_workers": 1,
                "max_client_batch_size": 4, "router": "text-generation-router",
                "version": "3.3.5-lean-double", "sha": None, "docker_label": None}

    def _unary(self, gen: Generation, as_array: bool) -> None:
        assert self.transport is not None
        reply: Any = [gen.reply()] if as_array else gen.reply()
        self.transport.write(_response(200, _dumps(reply).encode(), extra=gen.headers()))

    async def _slow_unary(self, gen: Generation, as_array: bool) -> None:
        await asyncio.sleep(gen.delay * gen.tokens)
        if self.transport is not None:
            self._unary(gen, as_array)
        self._done()

    def _stream(self, gen: Generation) -> None:
        assert self.transport is not None
        head = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                f"{gen.headers()}\r\n").encode()
        self.transport.write(head)
        if not gen.delay:
            payload = b"".join(gen.events())
            self.transport.write(_chunk(payload) + b"0\r\n\r\n")
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._slow_stream(gen))

    async def _slow_stream(self, gen: Generation) -> None:
        for event in gen.events():
            await asyncio.sleep(gen.delay)
            if self.transport is None:
                return  # the client went away: stop generating, as TGI does
            self.transport.write(_chunk(event))
        if self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        self._done()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    control = Control()
    server = await loop.create_server(
        lambda: HTTPProtocol(settings, control), settings.host, settings.port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m tools.lean_tgi_double", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=env("LEAN_TGI_HOST", "127.0.0.1"),
                   help="address to bind (env LEAN_TGI_HOST)")
    p.add_argument("--port", type=int, default=int(env("LEAN_TGI_PORT", "8090")),
                   help="port (env LEAN_TGI_PORT)")
    p.add_argument("--model-id", default=env("LEAN_TGI_MODEL_ID", "lean-tgi-double"),
                   help="model id in /info (env LEAN_TGI_MODEL_ID)")
    p.add_argument("--max-concurrent-requests", type=int,
                   default=int(env("LEAN_TGI_MAX_CONCURRENT_REQUESTS", "4096")),
                   help="reported in /info, not enforced (env LEAN_TGI_MAX_CONCURRENT_REQUESTS)")
    args = p.parse_args(argv)
    settings = Settings(args.host, args.port, args.model_id, args.max_concurrent_requests)
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
