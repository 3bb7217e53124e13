"""The OpenAI-compatible engine driver against the vLLM double (vLLM's HTTP
shapes, tools/vllm_double.py) served in-process on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from services.adapter.engines.base import EngineResult, EngineToken
from services.adapter.engines.openai_compatible import OpenAICompatibleEngine, error_from_engine
from services.common.engine_kinds import KINDS
from services.common.errors import MeshError, Reason
from services.common.registry import ENGINE_KINDS
from services.common.types import FinishReason, Grammar, Message, Parameters
from tests.harness.procs import free_port
from tools.vllm_double import State, create_app

MODEL = "Qwen/Qwen2-7B-Instruct-GPTQ-Int4"
CHATML = "<|im_start|>user\nhello there big world<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class VLLM:
    url: str
    state: State


@asynccontextmanager
async def vllm(**kw: object) -> AsyncIterator[VLLM]:
    state = State(MODEL, int(kw.get("max_model_len", 64)), int(kw.get("max_num_seqs", 2)),
                  float(kw.get("token_delay", 0.0)))  # type: ignore[arg-type]
    runner = web.AppRunner(create_app(state), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield VLLM(f"http://127.0.0.1:{port}/v1", state)
    finally:
        await runner.cleanup()


def backend(url: str, kind: str = "vllm", **kw: object) -> OpenAICompatibleEngine:
    return OpenAICompatibleEngine(url, kind=KINDS[kind], **kw)  # type: ignore[arg-type]


async def collect(b: OpenAICompatibleEngine, prompt, params: Parameters, timeout=10.0):
    return [e async for e in b.generate_stream(prompt, params, timeout)]


def test_the_registry_reads_the_one_table_of_engine_kinds():
    assert ENGINE_KINDS == tuple(KINDS) and ENGINE_KINDS[0] == "tgi"
    assert {k.api for k in KINDS.values()} == {"tgi", "openai"}


async def test_completion_counts_and_finish_reasons():
    async with vllm() as v:
        b = backend(v.url)  # no served model configured: found on /v1/models
        try:
            result = await b.generate(CHATML, Parameters(max_new_tokens=10), 5)
            assert result == EngineResult("hello there big world", 4, 6, FinishReason.EOS_TOKEN)
            assert v.state.last_body["model"] == MODEL
            assert v.state.last_body["temperature"] == 0.0  # greedy unless sampling
            short = await b.generate(CHATML, Parameters(max_new_tokens=2), 5)
            assert (short.text, short.finish_reason) == ("hello there", FinishReason.LENGTH)
            stopped = await b.generate(CHATML, Parameters(stop=("big",)), 5)
            assert stopped.finish_reason == FinishReason.STOP_SEQUENCE
        finally:
            await b.close()


async def test_stream_yields_text_then_the_usage_counts():
    async with vllm() as v:
        b = backend(v.url, served_model=MODEL)
        try:
            events = await collect(b, CHATML, Parameters(max_new_tokens=10))
            assert v.state.last_body["stream_options"] == {"include_usage": True}
            texts = [e.text for e in events if isinstance(e, EngineToken)]
            assert "".join(texts) == "hello there big world"
            assert events[-1] == EngineResult(
                "hello there big world", 4, 6, FinishReason.EOS_TOKEN)
        finally:
            await b.close()


async def test_chat_api_sends_the_conversation_to_chat_completions():
    async with vllm() as v:
        b = backend(v.url, chat_api=True)
        try:
            assert b.applies_template
            result = await b.generate((Message("user", "hi you"),), Parameters(), 5)
            assert result.text == "hi you"
            assert v.state.last_body["messages"] == [{"role": "user", "content": "hi you"}]
            events = await collect(b, (Message("user", "a b"),), Parameters())
            assert "".join(e.text for e in events if isinstance(e, EngineToken)) == "a b"
        finally:
            await b.close()


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, Reason.INVALID_ARGUMENT),
        (404, Reason.BACKEND_UNAVAILABLE),
        (429, Reason.OVERLOADED),
        (500, Reason.MODEL_ERROR),
        (503, Reason.BACKEND_UNAVAILABLE),
    ],
)
async def test_engine_errors_go_through_the_error_table(status, reason):
    async with vllm() as v:
        v.state.status = status
        b = backend(v.url, served_model=MODEL)
        try:
            for call in (b.generate(CHATML, Parameters(), 5), collect(b, CHATML, Parameters())):
                with pytest.raises(MeshError) as err:
                    await call
                assert err.value.reason is reason
                assert err.value.metadata["backend_status"] == str(status)
            if reason is Reason.OVERLOADED:
                assert err.value.retry_after == 1.0
        finally:
            await b.close()


async def test_vllm_refusals_keep_their_message():
    async with vllm(max_model_len=16) as v:
        b = backend(v.url, served_model="other-model")
        try:
            with pytest.raises(MeshError) as err:
                await b.generate(CHATML, Parameters(), 5)
            assert err.value.reason is Reason.BACKEND_UNAVAILABLE  # a wrong served model
            assert "does not exist" in err.value.message
            b.served_model = MODEL
            with pytest.raises(MeshError) as err:
                await b.generate(CHATML, Parameters(max_new_tokens=20), 5)
            assert err.value.reason is Reason.INVALID_ARGUMENT
            assert "maximum context length is 16 tokens" in err.value.message
            assert err.value.metadata["backend_error_type"] == "BadRequestError"
        finally:
            await b.close()


async def test_connection_refused_is_backend_unavailable():
    b = backend(f"http://127.0.0.1:{free_port()}/v1", served_model=MODEL)
    try:
        with pytest.raises(MeshError) as err:
            await b.generate("x", Parameters(), 5)
        assert err.value.reason is Reason.BACKEND_UNAVAILABLE
        assert not await b.health(1.0)
    finally:
        await b.close()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("error_midstream", Reason.MODEL_ERROR), ("die_midstream", Reason.INCOMPLETE_GENERATION)],
)
async def test_a_stream_that_breaks_after_tokens(mode, reason):
    async with vllm() as v:
        v.state.mode, v.state.after_tokens = mode, 2
        b = backend(v.url, served_model=MODEL)
        got: list[str] = []
        try:
            with pytest.raises(MeshError) as err:
                async for event in b.generate_stream(CHATML, Parameters(), 5):
                    assert isinstance(event, EngineToken)
                    got.append(event.text)
            assert err.value.reason is reason
            assert "".join(got) == "hello there"
        finally:
            await b.close()


async def test_cancelling_a_stream_closes_the_upstream_request():
    async with vllm(token_delay=0.05) as v:
        b = backend(v.url, served_model=MODEL)
        try:
            events = b.generate_stream(CHATML, Parameters(max_new_tokens=30), 10)
            assert isinstance(await anext(events), EngineToken)
            await events.aclose()  # type: ignore[attr-defined]
            for _ in range(100):
                if v.state.running == 0:
                    break
                await asyncio.sleep(0.02)
            assert (v.state.running, v.state.cancelled) == (0, 1)
        finally:
            await b.close()


async def test_the_deadline_is_the_requests_timeout():
    async with vllm() as v:
        v.state.mode = "hang"
        b = backend(v.url, served_model=MODEL)
        try:
            with pytest.raises(MeshError) as err:
                await collect(b, CHATML, Parameters(), timeout=0.3)
            assert err.value.reason is Reason.TIMEOUT
        finally:
            await b.close()


async def test_health_and_limits_from_the_engine():
    async with vllm(max_model_len=1024) as v:
        b = backend(v.url)
        try:
            assert await b.health()
            info = await b.info()
            assert (info.model_id, info.max_total_tokens, info.max_input_tokens) == (
                MODEL, 1024, 1023)
            v.state.mode = "dead"  # vLLM's /health answers 503 once its engine died
            assert not await b.health()
        finally:
            await b.close()


def test_each_dialect_spells_the_extras_its_own_way():
    params = Parameters(top_k=5, temperature=0.5, repetition_penalty=1.2, seed=7,
                        frequency_penalty=0.5, presence_penalty=0.25, stop=("x",))
    _, body = backend("http://h/v1", "vllm").body("p", params, False)
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.2 and body["seed"] == 7
    assert (body["frequency_penalty"], body["presence_penalty"], body["stop"]) == (
        0.5, 0.25, ["x"])
    _, body = backend("http://h/v1", "llamacpp").body("p", params, False)
    assert body["repeat_penalty"] == 1.2 and "repetition_penalty" not in body
    with pytest.raises(MeshError) as err:
        backend("http://h/v1", "openai").body("p", params, False)
    fields = [v.field for v in err.value.violations]
    assert fields == ["parameters.top_k", "parameters.repetition_penalty"]


def test_grammars_per_engine():
    schema = Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    regex = Grammar("regex", "[0-9]+")
    _, body = backend("http://h/v1", "vllm").body("p", Parameters(grammar=schema), False)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema.schema()
    _, body = backend("http://h/v1", "vllm").body("p", Parameters(grammar=regex), False)
    assert body["structured_outputs"] == {"regex": "[0-9]+"}
    _, body = backend("http://h/v1", "sglang").body("p", Parameters(grammar=regex), False)
    assert body["regex"] == "[0-9]+"
    _, body = backend("http://h/v1", "llamacpp").body("p", Parameters(grammar=schema), False)
    assert "root ::=" in body["grammar"]  # llama.cpp's GBNF
    for kind, grammar in (("llamacpp", regex), ("openai", regex), ("ollama", schema)):
        with pytest.raises(MeshError) as err:
            backend("http://h/v1", kind).body("p", Parameters(grammar=grammar), False)
        assert err.value.violations[0].field.startswith("parameters.grammar")


def test_error_shapes_other_servers_send():
    fastapi = error_from_engine(422, {"detail": [{"msg": "field required"}]})
    assert fastapi.reason is Reason.INVALID_ARGUMENT
    proxy = error_from_engine(502, "Bad Gateway")
    assert proxy.reason is Reason.BACKEND_UNAVAILABLE and "502" in proxy.message
    llama = error_from_engine(500, {"error": {"message": "bad\n\n  File \"app.py\", line 1",
                                              "type": "internal_server_error"}})
    assert llama.message == "bad"  # no server stack frames in what clients see
    inband = error_from_engine(200, {"error": {"message": "m", "code": 400}})
    assert inband.reason is Reason.INVALID_ARGUMENT
    busy = error_from_engine(429, {"error": {"message": "busy"}}, retry_after="3")
    assert busy.retry_after == 3.0
