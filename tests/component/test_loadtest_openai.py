"""The load test's OpenAI client against an in-process server that streams
OpenAI's chat completion chunks as the `openai` SDK reads them (the shapes of
shared reference openai-http-contract.md: a role delta first, content deltas,
a finish_reason chunk, with include_usage a `choices: []` chunk carrying
`usage`, then `data: [DONE]`; an error after the start is an `error` event;
errors before it are `{"error": {...}}` with the HTTP status)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from services.common.errors import MeshError, Reason
from services.openai.errors import error_object
from tools.loadtest import __main__ as cli
from tools.loadtest.clients import OpenAIClient, Record, Target
from tools.loadtest.workload import Item


def _chunk(delta: dict[str, Any] | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> bytes:
    event: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[Any]]]:
    seen: list[Any] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        mode = body["messages"][0]["content"]
        if mode == "busy":
            return web.json_response({"error": {"message": "busy", "type": "overloaded",
                                                "param": None, "code": "rate_limit"}},
                                     status=429)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": ""}))
        for word in ("a", " b", " c"):
            await resp.write(_chunk({"content": word}))
        if mode == "break":
            await resp.write(b'data: {"error": {"message": "boom", "type": "server_error", '
                             b'"code": "internal"}}\n\n')
            return resp
        if mode == "overloaded":  # the mesh's own in-stream error for a 429 reason
            error = error_object(MeshError(Reason.OVERLOADED, "the engine is full"))
            await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            return resp
        await resp.write(_chunk({}, finish="length"))
        await resp.write(_chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 4,
                                             "total_tokens": 13}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def run(url: str, prompt: str) -> Record:
    client = OpenAIClient(Target(url, "unused:0", api_key="k", temperature=0.0))
    record = Record(model="m", start=time.perf_counter())
    try:
        await client.run(Item(prompt, 4, "m"), record)
    finally:
        await client.close()
    return record


async def test_a_stream_counts_usage_tokens_and_its_chunks(server: Any) -> None:
    url, seen = server
    record = await run(url, "hello")
    assert record.ok
    assert (record.output_tokens, record.input_tokens) == (4, 9)  # from usage
    assert len(record.chunks) == 3  # the role-only delta is not content
    assert record.finish_reason == "length"
    assert seen[0]["stream"] is True
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert seen[0]["max_tokens"] == 4 and seen[0]["temperature"] == 0.0


async def test_429_and_in_band_errors_are_failures_with_reasons(server: Any) -> None:
    url, _ = server
    busy = await run(f"{url}/v1", "busy")  # a base URL that ends in /v1 works too
    assert not busy.ok and busy.rate_limited
    assert busy.error == "http 429 rate_limit"
    broken = await run(url, "break")
    assert not broken.ok and not broken.rate_limited
    assert broken.error == "in-band internal"


async def test_an_in_stream_overloaded_error_counts_as_rate_limited(server: Any) -> None:
    url, _ = server
    record = await run(url, "overloaded")
    assert not record.ok and record.rate_limited
    assert record.error == "in-band overloaded"


@pytest.fixture
async def caching_server() -> AsyncIterator[tuple[str, list[Any]]]:
    """An OpenAI server with a word-level prefix cache that it reports as vLLM
    does on /metrics (tokens queried, tokens found in the cache)."""
    seen: list[Any] = []
    cached: list[list[str]] = []
    counts = {"queries": 0, "hits": 0}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        words = " ".join(m["content"] for m in body["messages"]).split()
        best = 0
        for old in cached:
            n = 0
            while n < min(len(old), len(words)) and old[n] == words[n]:
                n += 1
            best = max(best, n)
        counts["queries"] += len(words)
        counts["hits"] += best
        cached.append(words)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"content": "ok"}))
        await resp.write(_chunk({}, finish="length"))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=(
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f'vllm:prefix_cache_queries_total{{model_name="m"}} {counts["queries"]}.0\n'
            f'vllm:prefix_cache_hits_total{{model_name="m"}} {counts["hits"]}.0\n'))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_shared_prefix_run_reports_the_engines_cache_hit_share(
    caching_server: Any,
) -> None:
    url, seen = caching_server
    settings = cli.settings_from([
        "--url", url, "--api", "openai", "--model", "m", "--concurrency", "1",
        "--prefixes", "2", "--prefix-tokens", "100", "--conversations", "2", "--turns", "3",
        "--suffix-tokens", "5", "--output-tokens", "4", "--requests", "6", "--no-progress",
        "--cache-metrics", f"{url}/metrics,http://127.0.0.1:9/metrics"])
    results = await cli.run(settings)
    (step,) = results["steps"]
    assert step["models"]["m"]["successes"] == 6
    # Turns 2 and 3 find their conversation so far in the cache: most prompt
    # words are hits; turn 1 of each conversation finds none.
    share = step["cache"]["hit_share"]
    assert share is not None and 0.5 < share < 1
    assert step["cache"]["queries"] == sum(
        len(" ".join(m["content"] for m in body["messages"]).split()) for body in seen)
    assert step["cache"]["engines"]["http://127.0.0.1:9/metrics"]["hit_share"] is None
    assert seen[0]["messages"][0]["role"] == "system"
    assert [len(b["messages"]) for b in seen] == [2, 2, 4, 4, 6, 6]
    assert f"| {share * 100:.1f}% |" in cli.report.table(results)
    assert [(t, v["requests"]) for t, v in step["turns"].items()] == [
        ("1", 2), ("2", 2), ("3", 2)]
