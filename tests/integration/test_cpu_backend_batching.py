"""Continuous batching and TGI's generation options on the real CPU backend.

Starts `python -m services.cpu_backend` (llama.cpp + SmolLM2-135M) with a
batch of 4 and checks, over HTTP as a TGI client would: greedy output alone
and in a batch, streams that interleave, a stream cancelled mid-batch while
its neighbours finish, the queue beyond the batch, structured output
(JSON schema and regex grammars) through the `text-generation` client,
top_n_tokens, best_of, and TGI's load metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from text_generation import AsyncClient
from text_generation.types import Grammar, GrammarType

from tests.harness.procs import free_port, python_module, start, stop, wait_http

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama_cpp is not importable: run scripts/install_llama_cpp.sh"
)
jsonschema = pytest.importorskip("jsonschema")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATCH = 4


def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("cpu_batching") / "server.log"
    cmd = python_module(
        "services.cpu_backend", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-id", "smollm2-test", "--max-batch-size", str(BATCH),
        "--max-concurrent-requests", "16",
        # One thread: on a shared machine two threads wait on each other at
        # every barrier; behaviour, not speed, is checked here.
        "--threads", "1",
    )  # fmt: skip
    proc = start(cmd, log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    text = await (await session.get(url + "/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def stream(
    session: aiohttp.ClientSession, url: str, prompt: str, max_new: int, **params: Any
) -> list[tuple[float, dict[str, Any]]]:
    """Every SSE event of one /generate_stream with the time it arrived."""
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, **params}}
    events = []
    async with session.post(url + "/generate_stream", json=payload) as resp:
        assert resp.status == 200
        while block := await resp.content.readuntil(b"\n\n"):
            if block.startswith(b"data:"):
                events.append((time.monotonic(), json.loads(block[5:])))
    return events


def ids(events: list[tuple[float, dict[str, Any]]]) -> list[int]:
    return [e["token"]["id"] for _, e in events]


PROMPTS = [
    chatml("Write a short story about a lighthouse keeper."),
    chatml("Explain how rain forms."),
    chatml("List five fruits and their colours."),
    chatml("Describe a busy market in the morning."),
]


async def test_greedy_output_is_the_same_alone_and_in_a_batch(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        alone = [ids(await stream(session, url, p, 48)) for p in PROMPTS]
        together = await asyncio.gather(*(stream(session, url, p, 48) for p in PROMPTS))
    batched = [ids(events) for events in together]
    # llama.cpp's batched kernels sum in another order than its one-sequence
    # ones, so identity is "as far as floats allow": measured in
    # docs/cpu-backend.md; here the first tokens must agree exactly.
    for solo, mixed in zip(alone, batched, strict=True):
        assert solo[:16] == mixed[:16]


async def test_concurrent_streams_interleave_in_time(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(stream(session, url, p, 40) for p in PROMPTS))
    firsts = [events[0][0] for events in results]
    lasts = [events[-1][0] for events in results]
    # Every stream had its first token before any stream had its last: they
    # were decoded side by side, not one after the other.
    assert max(firsts) < min(lasts)
    # And their tokens alternate: between two tokens of one stream, others arrive.
    merged = sorted((t, i) for i, events in enumerate(results) for t, _ in events)
    switches = sum(1 for a, b in itertools.pairwise(merged) if a[1] != b[1])
    assert switches > 20


async def test_a_stream_cancelled_mid_batch_leaves_the_others_whole(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        dropped = await metric(session, url, 'tgi_request_failure{err="dropped"}')
        payload = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 400}}
        doomed = await session.post(url + "/generate_stream", json=payload)
        others = [asyncio.create_task(stream(session, url, p, 60)) for p in PROMPTS[1:]]
        for _ in range(5):
            await doomed.content.readuntil(b"\n\n")
        doomed.close()
        results = await asyncio.gather(*others)
        for events in results:
            final = events[-1][1]
            assert final["generated_text"] is not None
            assert final["details"] is None or final["details"]["finish_reason"]
            assert len(events) >= 1
        deadline = time.monotonic() + 5
        while await metric(session, url, 'tgi_request_failure{err="dropped"}') < dropped + 1:
            assert time.monotonic() < deadline, "the cancelled stream was not dropped"
            await asyncio.sleep(0.05)
        assert await metric(session, url, "tgi_batch_current_size") == 0
        assert await metric(session, url, "tgi_queue_size") == 0


async def test_requests_beyond_the_batch_wait_in_the_queue(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(stream(session, url, PROMPTS[i % 4], 80)) for i in range(BATCH + 2)
        ]
        deadline = time.monotonic() + 20
        seen_queue = seen_batch = 0.0
        while time.monotonic() < deadline and not all(t.done() for t in tasks):
            seen_queue = max(seen_queue, await metric(session, url, "tgi_queue_size"))
            seen_batch = max(seen_batch, await metric(session, url, "tgi_batch_current_size"))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*tasks)
        max_tokens = await metric(session, url, "tgi_batch_current_max_tokens")
    assert all(events[-1][1]["generated_text"] is not None for events in results)
    assert seen_batch == BATCH
    assert seen_queue >= 1
    assert max_tokens == 0
    # Queue time is measured: the last two waited for a slot.
    text = ""
    async with aiohttp.ClientSession() as session:
        text = await (await session.get(url + "/metrics")).text()
    assert re.search(r"^tgi_request_queue_duration_count [1-9]", text, re.M)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


async def test_json_schema_grammar_through_the_text_generation_client(url: str) -> None:
    client = AsyncClient(url, timeout=120)
    response = await client.generate(
        chatml("Describe a person called Ana who lives in Lisbon, as JSON."),
        max_new_tokens=80,
        grammar=Grammar(type=GrammarType.Json, value=PERSON),
    )
    data = json.loads(response.generated_text)
    jsonschema.validate(data, PERSON)
    assert response.details.finish_reason.value == "eos_token"


async def test_json_schema_grammar_while_streaming_beside_free_text(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        free, constrained = await asyncio.gather(
            stream(session, url, PROMPTS[1], 40),
            stream(
                session, url, chatml("Give me a person as JSON."), 80,
                grammar={"type": "json", "value": json.dumps(PERSON)},
            ),
        )  # fmt: skip
    jsonschema.validate(json.loads(constrained[-1][1]["generated_text"]), PERSON)
    assert free[-1][1]["generated_text"]


async def test_regex_grammar(url: str) -> None:
    pattern = r"(yes|no), [0-9]{2} (apples|pears)"
    client = AsyncClient(url, timeout=120)
    response = await client.generate(
        chatml("Do you like fruit? Answer yes or no and a count."),
        max_new_tokens=30,
        grammar=Grammar(type=GrammarType.Regex, value=pattern),
    )
    assert re.fullmatch(pattern, response.generated_text), response.generated_text


async def test_unsupported_regex_is_tgis_validation_error(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        payload = {
            "inputs": "hi",
            "parameters": {"grammar": {"type": "regex", "value": r"(a)b\1"}},
        }
        resp = await session.post(url + "/generate", json=payload)
        assert resp.status == 422
        assert await resp.json() == {
            "error": "Input validation error: grammar is not valid: "
            "regex: backreferences are not supported",
            "error_type": "validation",
        }


async def test_top_n_tokens_lists_the_most_likely_tokens(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        payload = {
            "inputs": chatml("Name a colour."),
            "parameters": {"max_new_tokens": 8, "details": True, "top_n_tokens": 3},
        }
        body = await (await session.post(url + "/generate", json=payload)).json()
        events = await stream(session, url, chatml("Name a colour."), 8, top_n_tokens=3)
    details = body["details"]
    assert len(details["top_tokens"]) == len(details["tokens"])
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) == 3
        logprobs = [t["logprob"] for t in top]
        assert logprobs == sorted(logprobs, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert top[0]["id"] == token["id"]
    assert all(len(e["top_tokens"]) == 3 for _, e in events)


async def test_best_of_returns_the_best_sequence_and_the_others(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        payload = {
            "inputs": chatml("Name an animal."),
            "parameters": {"max_new_tokens": 12, "details": True, "best_of": 2,
                           "do_sample": True},
        }  # fmt: skip
        resp = await session.post(url + "/generate", json=payload)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    details = body["details"]
    others = details["best_of_sequences"]
    assert len(others) == 1

    def mean(tokens: list[dict[str, Any]]) -> float:
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(details["tokens"]) >= mean(others[0]["tokens"])
    assert details["seed"] != others[0]["seed"]


async def test_seeded_sampling_is_reproducible_in_a_batch(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        params = {"do_sample": True, "temperature": 0.9, "seed": 1234}
        alone = ids(await stream(session, url, PROMPTS[0], 24, **params))
        together = await asyncio.gather(
            stream(session, url, PROMPTS[0], 24, **params),
            *(stream(session, url, p, 24, do_sample=True) for p in PROMPTS[1:]),
        )
    assert ids(together[0])[:12] == alone[:12]

