"""The TGI double's model of a prefix cache: what it reuses, how long its
prefill waits, and what replies and /metrics say about it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.cpu_backend.server import CORE
from services.cpu_backend.settings import ServerSettings
from tools.tgi_double import PrefixCache, ScriptedEngine, create_double_app, parse_sse

pytestmark = pytest.mark.timeout(30)

SETTINGS = ServerSettings(
    model_id="test-model", max_input_tokens=1000, max_total_tokens=1100
)
# Scripted tokenization: one token per whitespace-separated word.
SYSTEM = " ".join(f"rule{i}" for i in range(40))


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_whole_leading_blocks_are_reused_never_the_last_token():
    cache = PrefixCache(1000, block_tokens=4)
    assert cache.lookup(ids(10)) == 0
    cache.store(ids(10))  # blocks [0:4] and [4:8]; the tail of 2 is not a block
    assert len(cache) == 2
    assert cache.lookup(ids(12)) == 8
    assert cache.lookup(ids(8)) == 7  # all held, but the last token is computed
    assert cache.lookup(ids(10, start=1)) == 0  # another beginning
    assert cache.lookup([0, 1, 2, 3, 99, 5, 6, 7]) == 4  # a block after a miss never counts
    assert (cache.queries, cache.hits) == (10 + 12 + 8 + 10 + 8, 8 + 7 + 4)


def test_capacity_is_in_tokens_and_least_recently_used_goes_first():
    cache = PrefixCache(16, block_tokens=4)  # four blocks
    a, b = ids(8), ids(8, start=100)
    cache.store(a)
    cache.store(b)
    cache.store(a[:4])  # a's first block used again
    cache.store(ids(4, start=200))  # one block too many: a's tail is the oldest
    assert len(cache) == 4
    assert cache.lookup([*a, 1]) == 4
    assert cache.lookup([*b, 1]) == 8
    with pytest.raises(ValueError):
        PrefixCache(3, block_tokens=4)
    with pytest.raises(ValueError):
        PrefixCache(16, prefill_per_token=-1.0)


@pytest.fixture
async def cached() -> AsyncIterator[tuple[TestClient, list[float]]]:
    cache = PrefixCache(4096, block_tokens=16, prefill_per_token=0.001)
    engine = ScriptedEngine(model_id="scripted", prefix_cache=cache)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    engine.sleep = record
    app = create_double_app(engine, SETTINGS)
    async with TestServer(app) as server, TestClient(server) as client:
        yield client, waits


async def generate(client: TestClient, inputs: str, path: str = "/generate") -> dict:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 3, "details": True}}
    resp = await client.post(path, json=body)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_a_later_turn_reports_its_cached_tokens_and_prefills_only_the_rest(
    cached: tuple[TestClient, list[float]],
) -> None:
    client, waits = cached
    first = await generate(client, SYSTEM + " first question")  # 42 tokens
    assert first["details"]["cached_tokens"] == 0
    second = await generate(client, SYSTEM + " first question answer second question")
    assert second["details"]["cached_tokens"] == 32  # two whole blocks of 16
    assert waits == pytest.approx([42 * 0.001, (45 - 32) * 0.001])
    # TGI's `/` answers a list; each reply carries the field.
    resp = await client.post("/", json={"inputs": SYSTEM, "parameters": {"details": True}})
    assert (await resp.json())[0]["details"]["cached_tokens"] == 32


async def test_the_final_stream_event_carries_cached_tokens(
    cached: tuple[TestClient, list[float]],
) -> None:
    client, _ = cached
    await generate(client, SYSTEM)
    body = {"inputs": SYSTEM + " more", "parameters": {"max_new_tokens": 3, "details": True}}
    resp = await client.post("/generate_stream", json=body)
    events = parse_sse(await resp.read())
    assert events[-1]["details"]["cached_tokens"] == 32
    assert events[-1]["details"]["input_length"] == 41
    assert all(e["details"] is None for e in events[:-1])


async def test_metrics_count_prompt_tokens_looked_up_and_reused(
    cached: tuple[TestClient, list[float]],
) -> None:
    client, _ = cached
    await generate(client, SYSTEM)
    await generate(client, SYSTEM + " again")
    text = await (await client.get("/metrics")).text()
    assert "llmmesh_cpu_prefix_cache_queries_total 81.0" in text
    assert "llmmesh_cpu_prefix_cache_hits_total 32.0" in text
    engine = client.app[CORE].engine
    assert isinstance(engine, ScriptedEngine) and engine.prefix_cache is not None
    assert engine.prefix_cache.hits == 32


async def test_without_the_option_nothing_is_cached() -> None:
    engine = ScriptedEngine(model_id="scripted")
    app = create_double_app(engine, SETTINGS)
    async with TestServer(app) as server, TestClient(server) as client:
        for _ in range(2):
            reply = await generate(client, SYSTEM)
            assert reply["details"]["cached_tokens"] == 0  # as the CPU backend with its cache off
        text = await (await client.get("/metrics")).text()
        assert "llmmesh_cpu_prefix_cache_hits_total 0.0" in text
        body = {"inputs": SYSTEM, "parameters": {"max_new_tokens": 2, "details": True}}
        resp = await client.post("/generate_stream", json=body)
        raw = await resp.read()
        assert json.loads(raw.split(b"data:")[-1])["details"]["cached_tokens"] == 0
