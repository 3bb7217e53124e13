"""Prefix caching on the real CPU backend (llama.cpp + SmolLM2-135M).

Two backends side by side, one with the prefix cache and one without
(`--prefix-cache off`), receive the same two-turn conversations: turn 2
repeats turn 1's prompt and answer, so the caching backend prefills only
the new tokens. What the cache must not change: the generated tokens, with
greedy decoding, penalties, a grammar or a seeded sampler. What it must
change: the reported `cached_tokens`, the prefix-cache metrics, and turn 2's
time to its first token (<= 1/5 of turn 1's with a ~1,200-token prefix).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.procs import free_port, python_module, start, stop, wait_http

pytest.importorskip(
    "llama_cpp", reason="llama_cpp is not importable: run scripts/install_llama_cpp.sh"
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FILLER = (
    "The harbour town woke slowly, fishermen mending nets while gulls argued over "
    "scraps and the bakery sent warm bread smells down the cobbled lanes. "
)


def backend(tmp: Path, *flags: str) -> Iterator[str]:
    port = free_port()
    cmd = python_module(
        "services.cpu_backend", "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", "2", "--max-input-tokens", "1800", "--max-total-tokens", "2048",
        # One thread: on a shared machine two threads wait on each other at
        # every barrier.
        "--threads", "1", *flags,
    )  # fmt: skip
    proc = start(cmd, log_path=tmp / "server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from backend(tmp_path_factory.mktemp("cache_on"))


@pytest.fixture(scope="module")
def uncached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from backend(tmp_path_factory.mktemp("cache_off"), "--prefix-cache", "off")


def system(name: str, words: int) -> str:
    body = " ".join((FILLER * (words // 20 + 1)).split()[:words])
    return f"<|im_start|>system\nYou are {name}, a harbour guide.\n{body}<|im_end|>\n"


def turn(prompt: str, user: str) -> str:
    return f"{prompt}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


async def generate(
    session: aiohttp.ClientSession, url: str, inputs: str, **params: Any
) -> dict[str, Any]:
    payload = {"inputs": inputs, "parameters": {"details": True, **params}}
    async with session.post(url + "/generate", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def conversation(url: str, name: str, **params: Any) -> list[dict[str, Any]]:
    """Two turns; turn 2 carries turn 1's prompt and answer."""
    async with aiohttp.ClientSession() as session:
        first = turn(system(name, 150), "What does the town do in the morning?")
        one = await generate(session, url, first, **params)
        second = turn(f"{first}{one['generated_text']}<|im_end|>\n", "And the gulls?")
        two = await generate(session, url, second, **params)
        # The same prompt again: all but its last token are cached.
        three = await generate(session, url, second, **params)
    return [one, two, three]


def token_ids(reply: dict[str, Any]) -> list[int]:
    return [t["id"] for t in reply["details"]["tokens"]]


CASES = {
    "greedy": {"max_new_tokens": 32},
    "penalties": {"max_new_tokens": 32, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
    "grammar": {
        "max_new_tokens": 40,
        "grammar": {
            "type": "json",
            "value": {
                "type": "object",
                "properties": {"answer": {"type": "string", "maxLength": 40}},
                "required": ["answer"],
            },
        },
    },
    "seeded": {
        "max_new_tokens": 32,
        "do_sample": True,
        "seed": 42,
        "temperature": 0.8,
        "top_k": 40,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_output_is_the_same_with_and_without_the_cache(
    cached: str, uncached: str, case: str
) -> None:
    params = CASES[case]
    with_cache = await conversation(cached, f"Guide {case}", **params)
    without = await conversation(uncached, f"Guide {case}", **params)
    for i, (hot, cold) in enumerate(zip(with_cache, without, strict=True)):
        assert token_ids(hot) == token_ids(cold), f"turn {i}"
        assert hot["generated_text"] == cold["generated_text"]
        assert cold["details"]["cached_tokens"] == 0
    # Turn 2 reused turn 1's prompt; the repeat, all but its last two tokens.
    assert with_cache[0]["details"]["cached_tokens"] == 0
    assert with_cache[1]["details"]["cached_tokens"] > 200
    assert with_cache[2]["details"]["cached_tokens"] > with_cache[1]["details"]["cached_tokens"]
    if case == "grammar":
        for reply in with_cache:
            assert "answer" in json.loads(reply["generated_text"])


async def first_token(session: aiohttp.ClientSession, url: str, inputs: str) -> tuple[float, str]:
    """Seconds to the first token of a stream, and the whole answer."""
    payload = {"inputs": inputs, "parameters": {"max_new_tokens": 24, "details": True}}
    start_at = time.monotonic()
    ttft = 0.0
    final: dict[str, Any] = {}
    async with session.post(url + "/generate_stream", json=payload) as resp:
        assert resp.status == 200
        while block := await resp.content.readuntil(b"\n\n"):
            if block.startswith(b"data:"):
                event = json.loads(block[5:])
                if not ttft:
                    ttft = time.monotonic() - start_at
                if event["details"] is not None:
                    final = event
    assert final["details"]["cached_tokens"] >= 0
    return ttft, str(final["generated_text"])


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    text = await (await session.get(url + "/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_turn_two_of_a_long_conversation_starts_at_least_five_times_sooner(
    cached: str,
) -> None:
    async with aiohttp.ClientSession() as session:
        queries = await metric(session, cached, "llmmesh_cpu_prefix_cache_queries_total")
        hits = await metric(session, cached, "llmmesh_cpu_prefix_cache_hits_total")
        first = turn(system("Captain Ada", 1000), "Where do the fishermen work?")
        tokens = len(
            await (await session.post(cached + "/tokenize", json={"inputs": first})).json()
        )
        assert 1100 <= tokens <= 1500
        ttft1, answer = await first_token(session, cached, first)
        second = turn(f"{first}{answer}<|im_end|>\n", "What smells good?")
        ttft2, _ = await first_token(session, cached, second)
        queries_after = await metric(session, cached, "llmmesh_cpu_prefix_cache_queries_total")
        hits_after = await metric(session, cached, "llmmesh_cpu_prefix_cache_hits_total")
    assert ttft2 <= ttft1 / 5, (ttft1, ttft2)
    # Metrics count prompt tokens: both prompts looked up, turn 1's reused.
    second_tokens = queries_after - queries - tokens
    assert second_tokens > tokens
    assert tokens <= hits_after - hits < second_tokens
