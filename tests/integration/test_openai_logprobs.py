"""Logprobs and `n` through the real processes (the launched mesh in front of
two TGI doubles) with the official `openai` SDK: every logprob is the one
the double generated (tools/tgi_double.py: `piece_logprob`, `alternatives`),
several choices are several generations, and a client that leaves cancels
them all."""

from __future__ import annotations

import base64
import json
import socket
import time

import openai
import pytest

from tests.harness.mesh import Mesh
from tests.harness.parts import http_json
from tests.harness.wait import eventually
from tools.tgi_double import alternatives, piece_logprob

pytestmark = pytest.mark.integration

REPLY = "Tea is a hot drink"
WORDS = ["Tea", " is", " a", " hot", " drink"]
USER = [{"role": "user", "content": "anything"}]


@pytest.fixture
def client(clean: Mesh) -> openai.OpenAI:
    clean.doubles["qwen2"].control(reply=REPLY)
    return openai.OpenAI(base_url=f"{clean.http}/v1", api_key="none", max_retries=0, timeout=30)


def expected_top(word: str, n: int) -> list[tuple[str, float]]:
    return [(t.text, t.logprob or 0.0) for t in alternatives(word, n)]


def test_chat_logprobs_are_the_engines(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwen2", messages=USER, logprobs=True,
                                           top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == REPLY
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in content] == WORDS
    assert [t.logprob for t in content] == [piece_logprob(w) for w in WORDS]
    assert [t.bytes for t in content] == [list(w.encode()) for w in WORDS]
    for token, word in zip(content, WORDS, strict=True):
        assert [(a.token, a.logprob) for a in token.top_logprobs] == expected_top(word, 3)
    # Without them: null, as OpenAI answers.
    plain = client.chat.completions.create(model="qwen2", messages=USER)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed_per_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="qwen2", messages=USER, logprobs=True,
                                            top_logprobs=2, stream=True)
    tokens = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                tokens.extend(choice.logprobs.content)
    assert [(t.token, t.logprob) for t in tokens] == [(w, piece_logprob(w)) for w in WORDS]
    assert [[(a.token, a.logprob) for a in t.top_logprobs] for t in tokens] == [
        expected_top(w, 2) for w in WORDS]


def test_completion_logprobs_in_the_legacy_shape(clean: Mesh, client: openai.OpenAI) -> None:
    reply = client.completions.create(model="qwen2", prompt="anything", logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and reply.choices[0].text == REPLY
    assert logprobs.tokens == WORDS
    assert logprobs.token_logprobs == [piece_logprob(w) for w in WORDS]
    assert logprobs.top_logprobs == [dict(expected_top(w, 2)) for w in WORDS]
    assert logprobs.text_offset == [0, 3, 6, 8, 12]
    sent = clean.doubles["qwen2"].stats()["last_request"]["body"]["parameters"]
    assert sent["top_n_tokens"] == 2 and sent["details"] is True
    # Streamed: each chunk's tokens, offsets counted across chunks.
    offsets: list[int] = []
    words: list[str] = []
    for chunk in client.completions.create(model="qwen2", prompt="anything", logprobs=1,
                                           stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                words += choice.logprobs.tokens or []
                offsets += choice.logprobs.text_offset or []
    assert words == WORDS and offsets == [0, 3, 6, 8, 12]


def test_the_native_api_carries_logprobs(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(reply=REPLY)
    body = {"model_id": "qwen2", "inputs": "anything",
            "parameters": {"logprobs": True, "top_logprobs": 2}}
    status, _, raw = http_json("POST", f"{clean.http}/v1/generate", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    reply = json.loads(raw)
    assert status == 200, reply
    assert [t["token"] for t in reply["logprobs"]] == WORDS
    first = reply["logprobs"][0]
    assert first["logprob"] == piece_logprob("Tea")
    assert base64.b64decode(first["token_bytes"]) == b"Tea"
    assert [(a["token"], a["logprob"]) for a in first["top_logprobs"]] == expected_top("Tea", 2)


def test_top_logprobs_over_the_engines_limit_is_the_engines_400(client: openai.OpenAI) -> None:
    # TGI (and the double, which is its HTTP layer) allows 5 alternatives by default.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen2", messages=USER, logprobs=True,
                                       top_logprobs=8)
    assert "top_n_tokens" in err.value.body["message"]


def test_n_choices_are_generations_of_their_own(clean: Mesh, client: openai.OpenAI) -> None:
    double = clean.doubles["qwen2"]
    before = double.stats()["generations_started"]
    reply = client.chat.completions.create(model="qwen2", messages=USER, n=3, seed=11,
                                           temperature=0.7, logprobs=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [REPLY] * 3
    assert all([t.token for t in c.logprobs.content] == WORDS  # type: ignore[union-attr]
               for c in reply.choices)
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 3 * (len(WORDS) + 1)  # and EOS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert double.stats()["generations_started"] - before == 3


def test_n_choices_streamed_with_their_index(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="qwen2", messages=USER, n=3, stream=True,
                                            stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    roles = 0
    last = None
    for chunk in stream:
        last = chunk
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles += choice.delta.role == "assistant"
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert texts == {0: REPLY, 1: REPLY, 2: REPLY}
    assert finished == {0: "stop", 1: "stop", 2: "stop"} and roles == 3
    assert last is not None and last.usage is not None
    assert last.usage.completion_tokens == 3 * (len(WORDS) + 1)
    # Completions too.
    stream2 = client.completions.create(model="qwen2", prompt="anything", n=2, stream=True)
    indexes = {c.index for chunk in stream2 for c in chunk.choices}
    assert indexes == {0, 1}


def test_a_client_that_leaves_cancels_every_choice(clean: Mesh) -> None:
    double = clean.doubles["qwen2"]
    double.control(reply=" ".join(["word"] * 200), token_delay=0.05)
    before = double.stats()
    host, port = clean.envoy.split(":")
    body = json.dumps({"model": "qwen2", "messages": USER, "n": 3, "stream": True,
                       "max_tokens": 200}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in sock.recv(4096)
        eventually(lambda: double.stats()["generations_active"] == 3, timeout=10)
        time.sleep(0.2)

    def all_cancelled() -> bool:
        after = double.stats()
        return bool(after["generations_active"] == 0 and after["generations_cancelled"]
                    - before["generations_cancelled"] == 3)

    eventually(all_cancelled, timeout=10, what="the three generations cancelled")
