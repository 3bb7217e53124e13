"""The TGI driver's kept-alive connections: replies as engines send them,
and failures as the error table's reasons."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from services.adapter.engines.tgi import TGIEngine
from services.common.errors import MeshError, Reason
from services.common.types import FinishReason, Parameters
from tests.harness.procs import free_port

REPLY = json.dumps([{"generated_text": "hi there",
                     "details": {"finish_reason": "length", "generated_tokens": 2}}]).encode()


def fixed(status: bytes, headers: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + headers + b"\r\n" + body


@asynccontextmanager
async def engine(
    answer: Callable[[int], bytes | None],
) -> AsyncIterator[tuple[TGIEngine, list[int]]]:
    """A server that answers request n with answer(n) (None: hang up)."""
    connections: list[int] = []
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                count += 1
                out = answer(count)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tgi = TGIEngine(f"http://127.0.0.1:{port}")
    try:
        yield tgi, connections
    finally:
        await tgi.close()
        server.close()


async def test_replies_by_length_and_chunked_share_one_connection() -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(REPLY), REPLY)

    def answer(n: int) -> bytes:
        if n % 2:
            return fixed(b"200 OK", b"Content-Length: %d\r\nx-prompt-tokens: 5\r\n" % len(REPLY),
                         REPLY)
        return fixed(b"200 OK", b"Transfer-Encoding: chunked\r\n", chunked)

    async with engine(answer) as (tgi, connections):
        for _ in range(4):
            result = await tgi.generate("p", Parameters(max_new_tokens=2), 5)
            assert (result.text, result.generated_tokens) == ("hi there", 2)
            assert result.finish_reason == FinishReason.LENGTH
        assert len(connections) == 1


async def test_connection_close_is_honoured_and_errors_are_tgis() -> None:
    error = json.dumps({"error": "Input validation error", "error_type": "validation"}).encode()

    def answer(n: int) -> bytes:
        return fixed(b"422 Unprocessable Entity",
                     b"Content-Length: %d\r\nConnection: close\r\n" % len(error), error)

    async with engine(answer) as (tgi, connections):
        for _ in range(2):
            with pytest.raises(MeshError) as caught:
                await tgi.generate("p", Parameters(), 5)
            assert caught.value.reason is Reason.INVALID_ARGUMENT
        assert len(connections) == 2


async def test_a_hang_up_is_an_incomplete_generation() -> None:
    async with engine(lambda n: None) as (tgi, _):
        with pytest.raises(MeshError) as caught:
            await tgi.generate("p", Parameters(), 5)
        assert caught.value.reason is Reason.INCOMPLETE_GENERATION


async def test_no_engine_is_unavailable_and_a_slow_one_times_out() -> None:
    tgi = TGIEngine(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MeshError) as caught:
        await tgi.generate("p", Parameters(), 5)
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE
    await tgi.close()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    tgi = TGIEngine(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    with pytest.raises(MeshError) as caught:
        await tgi.generate("p", Parameters(), 0.2)
    assert caught.value.reason is Reason.TIMEOUT
    await tgi.close()
    server.close()


async def test_a_cancelled_call_closes_its_connection() -> None:
    gate = asyncio.Event()
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        gate.set()
        await reader.read()  # until the driver closes its end
        closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    tgi = TGIEngine(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    call = asyncio.create_task(tgi.generate("p", Parameters(), 5))
    await gate.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(closed.wait(), 2)
    await tgi.close()
    server.close()
