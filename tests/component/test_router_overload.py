"""Past what one router relays: ten times its bound of streams at once get a
plain RESOURCE_EXHAUSTED (HTTP 429 with Retry-After on the OpenAI face) at
once, never another error, and the admitted streams keep their pace."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import aiohttp
import grpc
from llmmesh.v1 import generate_pb2 as pb

from services.openai.app import OpenAIFace, OpenAISettings
from services.openai.server import start_listener
from tests.fakes.backend import FakeBackend

BOUND = 5
WORDS = 20
DELAY = 0.02  # 20 tokens in 0.4 s


async def grpc_stream(router) -> tuple[str, float]:
    started = time.monotonic()
    request = pb.GenerateStreamRequest(model_id="qwen2", inputs="x")
    try:
        replies = [m async for m in router.stub.GenerateStream(request, timeout=20)]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, time.monotonic() - started
    last = replies[-1]
    assert last.tokens == WORDS and not last.HasField("error")
    return "OK", time.monotonic() - started


async def test_ten_times_the_bound_of_streams(start_adapter, start_router):
    adapter = await start_adapter("qwen2", FakeBackend(words=["w "] * WORDS, delay=DELAY))
    router = await start_router({"qwen2": [adapter.address]})
    router.core._max_total = BOUND
    outcomes = await asyncio.gather(*(grpc_stream(router) for _ in range(10 * BOUND)))
    counts = Counter(code for code, _ in outcomes)
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"}, counts
    assert counts["OK"] >= BOUND
    refused = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
    admitted = [t for code, t in outcomes if code == "OK"]
    # Refused at once (typically a few ms), well before an admitted stream ends;
    # admitted streams at their pace. Generous, for a loaded machine.
    assert statistics.median(refused) < min(admitted), (refused, admitted)
    assert max(admitted) < 2 * WORDS * DELAY + 1.0, admitted
    assert len(adapter.backend.prompts) == counts["OK"]  # the refused never reached it

    settings = OpenAISettings(port=0, request_timeout=10, grace_seconds=1)
    listener = await start_listener(OpenAIFace(router.core, router.metrics, settings), settings)
    try:
        async with aiohttp.ClientSession() as http:

            async def one() -> tuple[int, str | None]:
                async with http.post(
                    f"http://127.0.0.1:{listener.port}/v1/chat/completions",
                    json={"model": "qwen2", "stream": True,
                          "messages": [{"role": "user", "content": "x"}]},
                ) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After")

            replies = await asyncio.gather(*(one() for _ in range(10 * BOUND)))
    finally:
        await listener.stop()
    statuses = Counter(status for status, _ in replies)
    assert set(statuses) == {200, 429}, statuses
    assert all(after == "1" for status, after in replies if status == 429)
