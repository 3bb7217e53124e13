"""The OpenAI face on a real socket over the router's core and real adapters
(in-process backends), driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from services.adapter.engines.base import EngineToken
from services.common.auth import ApiKeys
from services.common.errors import MeshError, Reason
from services.openai.app import OpenAIFace, OpenAISettings
from services.openai.server import OpenAIListener, start_listener
from tests.fakes.backend import FakeBackend

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
async def face(start_adapter, start_router) -> AsyncIterator[Callable[..., Any]]:
    listeners: list[OpenAIListener] = []

    async def start(backend: FakeBackend | None = None, *, keys: ApiKeys | None = None,
                    timeout: float = 30.0, max_in_flight: int = 512) -> Any:
        adapter = await start_adapter("qwen2", backend or FakeBackend())
        router = await start_router({"qwen2": [adapter.address]}, max_in_flight=max_in_flight)
        settings = OpenAISettings(port=0, request_timeout=timeout, grace_seconds=1)
        listener = await start_listener(
            OpenAIFace(router.core, router.metrics, settings, keys), settings)
        listeners.append(listener)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{listener.port}/v1", api_key="k1", max_retries=0)
        return client, adapter, router, listener

    yield start
    for listener in listeners:
        await listener.stop()


def sample(router: Any, name: str, **labels: str) -> float:
    value = router.metrics.registry.get_sample_value(name, {"service": "router", **labels})
    return float(value or 0)


async def test_chat_and_its_books(face):
    client, adapter, router, _ = await face()
    reply = await client.chat.completions.create(model="qwen", messages=USER)
    assert reply.object == "chat.completion" and reply.model == "qwen2"
    assert reply.choices[0].message.content == "Hello there, friend."
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 5)
    # The chat template of the model was applied in the adapter.
    assert "<|im_start|>user\nSay hello<|im_end|>" in adapter.backend.prompts[-1]
    labels = {"model": "qwen2", "scenario": "chat", "method": "Generate", "code": "OK"}
    assert sample(router, "llmmesh_requests_total", **labels) == 1
    assert sample(router, "llmmesh_output_tokens_total", model="qwen2") == 5


async def test_stream_with_usage(face):
    client, _, router, _ = await face()
    stream = await client.chat.completions.create(
        model="qwen2", messages=USER, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, friend."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert sample(router, "llmmesh_time_to_first_token_seconds_count", model="qwen2") == 1


async def test_length_finish_and_completions(face):
    client, adapter, _, _ = await face()
    reply = await client.completions.create(model="qwen2", prompt="Once", max_tokens=2)
    assert reply.choices[0].text == "Hello there" and reply.choices[0].finish_reason == "length"
    assert adapter.backend.prompts[-1] == "Once"  # raw: no chat template


async def test_errors_before_the_stream_are_statuses(face):
    client, _, _, _ = await face()
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="gpt-9", messages=USER, stream=True)
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="qwen2", messages=USER, max_tokens=10**6)
    assert bad.value.body["param"] == "max_tokens"
    assert "max_tokens: must be between 1 and" in bad.value.body["message"]


async def test_error_after_the_stream_started_is_raised_by_the_sdk(face):
    backend = FakeBackend(fail=MeshError(Reason.MODEL_ERROR, "CUDA out of memory"),
                          fail_after=2)
    client, _, router, _ = await face(backend)
    stream = await client.chat.completions.create(model="qwen2", messages=USER, stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="CUDA out of memory"):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["Hello", " there"]
    assert sample(router, "llmmesh_errors_total", model="qwen2", reason="model_error") == 1


async def test_overload_is_a_rate_limit_with_retry_after(face):
    client, _, _, _ = await face(max_in_flight=0)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="qwen2", messages=USER)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["code"] == "overloaded"


async def test_model_down_is_a_server_error(face):
    client, _, _, _ = await face()
    with pytest.raises(openai.InternalServerError) as err:  # llama3 has no adapter
        await client.chat.completions.create(model="llama3", messages=USER)
    assert err.value.status_code == 503
    assert err.value.body["code"] == "model_unavailable"
    # Which model, and since when the router has seen it down.
    message = err.value.body["message"]
    assert re.search(r"^model llama3 has had no serving replica since "
                     r"\d\d:\d\d:\d\d UTC \(\d+ s ago\)", message), message


async def test_the_request_timeout_applies(face):
    client, _, _, _ = await face(FakeBackend(delay=5), timeout=0.3)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model="qwen2", messages=USER)
    assert err.value.status_code == 504 and err.value.body["code"] == "timeout"


async def test_api_keys(face):
    client, _, _, _ = await face(keys=ApiKeys(["k1"]))
    assert (await client.models.list()).data[0].id == "qwen2"
    wrong = client.with_options(api_key="nope")
    with pytest.raises(openai.AuthenticationError) as err:
        await wrong.chat.completions.create(model="qwen2", messages=USER)
    assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.retrieve("qwen2")


async def test_models(face):
    client, _, _, _ = await face()
    listing = await client.models.list()
    assert [m.id for m in listing.data] == ["qwen2", "llama3"]
    model = await client.models.retrieve("Qwen/Qwen2-7B-Instruct-GPTQ-Int4")
    assert model.id == "qwen2" and model.owned_by == "llmmesh"
    assert model.model_extra["backend_model"] == "fake/model"


class Pausing(FakeBackend):
    """The first word at once, then one every `pause` seconds; counts the
    generations cancelled, streamed or not."""

    pause = 10.0

    async def generate(self, prompt, params, timeout):
        try:
            await asyncio.sleep(self.pause)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().generate(prompt, params, timeout)

    async def generate_stream(self, prompt, params, timeout):
        try:
            for i, word in enumerate(self.words):
                if i:
                    await asyncio.sleep(self.pause)
                yield EngineToken(word)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


async def test_a_client_that_leaves_cancels_the_generation(face):
    # Between two tokens nothing is written: only the handler's cancellation
    # on disconnect (not a failed write) can stop the generation this soon.
    backend = Pausing(words=["w "] * 200)
    _, _, router, listener = await face(backend)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"http://127.0.0.1:{listener.port}/v1/chat/completions",
            json={"model": "qwen2", "messages": USER, "stream": True, "max_tokens": 200})
        assert resp.status == 200
        await resp.content.readline()  # the first event
        resp.close()  # the connection goes
    for _ in range(40):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 1
    labels = {"model": "qwen2", "scenario": "chat", "method": "GenerateStream",
              "code": "CANCELLED"}
    for _ in range(50):
        if sample(router, "llmmesh_requests_total", **labels) == 1:
            break
        await asyncio.sleep(0.05)
    assert sample(router, "llmmesh_requests_total", **labels) == 1


async def test_bodies_that_are_not_json_or_routes_that_do_not_exist(face):
    _, _, _, listener = await face()
    base = f"http://127.0.0.1:{listener.port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.post(f"{base}/v1/chat/completions", data=b"x" * (1024 * 1024 + 10)) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        async with http.get(f"{base}/v1/chat/completions") as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
            assert "POST /v1/chat/completions" in error["message"]
            assert error["code"] == "route_not_found" and error["param"] is None


async def test_stop_lets_open_streams_finish_and_refuses_new_connections(face):
    backend = FakeBackend(words=["w "] * 10, delay=0.05)
    client, _, _, listener = await face(backend)
    stream = await client.chat.completions.create(model="qwen2", messages=USER, stream=True)
    stopping = asyncio.create_task(listener.stop())
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "w " * 10
    await stopping
    with pytest.raises(openai.APIConnectionError):
        await client.models.list()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "qwen2", "messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages"),
        (b'{"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], '
         b'"stop": ["\\udfff x"]}', "stop"),
        (b'{"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "x": '
         + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
        (b'{"model": "qwen2", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    ],
    ids=["surrogate-in-content", "surrogate-in-stop", "deep-unknown-field", "deep-messages"],
)
async def test_hostile_bodies_are_a_400_in_openais_shape(face, raw, param):
    backend = FakeBackend()
    _, _, _, listener = await face(backend)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{listener.port}/v1/chat/completions",
                               data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert param in (error.get("param") or "") + error["message"]
    assert not backend.prompts


async def test_a_client_that_leaves_a_unary_request_cancels_the_generation(face):
    backend = Pausing()
    _, _, router, listener = await face(backend)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        with pytest.raises(TimeoutError):
            await http.post(f"http://127.0.0.1:{listener.port}/v1/chat/completions",
                            json={"model": "qwen2", "messages": USER})
    for _ in range(40):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 1
    labels = {"model": "qwen2", "scenario": "chat", "method": "Generate", "code": "CANCELLED"}
    for _ in range(50):
        if sample(router, "llmmesh_requests_total", **labels) == 1:
            break
        await asyncio.sleep(0.05)
    assert sample(router, "llmmesh_requests_total", **labels) == 1


async def test_n_choices_are_seeded_requests_of_their_own(face):
    backend = FakeBackend()
    client, _, router, _ = await face(backend)
    reply = await client.chat.completions.create(model="qwen2", messages=USER, n=3, seed=7,
                                                 temperature=0.5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert sorted(p.seed for p in backend.params) == [7, 8, 9]
    assert reply.usage.completion_tokens == 15 and reply.usage.prompt_tokens == 7
    labels = {"model": "qwen2", "scenario": "chat", "method": "Generate", "code": "OK"}
    assert sample(router, "llmmesh_requests_total", **labels) == 1
    assert sample(router, "llmmesh_output_tokens_total", model="qwen2") == 15


class _ThirdFails(FakeBackend):
    """Generates slowly; the third stream it is asked for fails at once."""

    async def generate_stream(self, prompt, params, timeout):
        if len(self.prompts) == 2:
            self.prompts.append(prompt)
            await asyncio.sleep(0.2)
            raise MeshError(Reason.MODEL_ERROR, "choice failed")
        async for event in super().generate_stream(prompt, params, timeout):
            yield event


async def test_a_failing_choice_ends_the_stream_and_stops_the_others(face):
    backend = _ThirdFails(words=["w "] * 100, delay=0.05)
    client, adapter, _, _ = await face(backend)
    stream = await client.chat.completions.create(model="qwen2", messages=USER, n=3,
                                                  stream=True, max_tokens=100)
    indexes = set()
    with pytest.raises(openai.APIError, match="choice failed"):
        async for chunk in stream:
            indexes.update(c.index for c in chunk.choices)
    assert len(indexes) == 2  # the two choices that generated
    # They would generate for 5 s more: they are stopped instead.
    for _ in range(40):
        if backend.cancelled == 2:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 2 and adapter.core._in_flight == 0
