"""The adapter's core against an in-process backend."""

from pathlib import Path

import pytest

from services.adapter.chat_template import ChatTemplate
from services.adapter.core import AdapterCore
from services.adapter.engines.base import EngineInfo
from services.common.errors import MeshError, Reason
from services.common.metrics import Metrics
from services.common.registry import load_registry
from services.common.types import Chunk, FinishReason, Generation, GenerationRequest, Message
from tests.fakes.backend import FakeBackend

ROOT = Path(__file__).parents[2]
SPEC = load_registry(ROOT / "models" / "registry.yaml", env={}).get("qwen2")
TEMPLATE = ChatTemplate.load(ROOT / "models" / "templates" / "qwen2.jinja")


def make(backend: FakeBackend | None = None, **kw) -> tuple[AdapterCore, FakeBackend]:
    backend = backend or FakeBackend()
    return AdapterCore(SPEC, backend, TEMPLATE, Metrics("adapter-test"), **kw), backend


def req(**kw) -> GenerationRequest:
    kw.setdefault("model_id", "qwen2")
    kw.setdefault("inputs", "你好")
    return GenerationRequest(**kw)


async def test_generate_renders_template_and_counts_tokens():
    core, backend = make()
    result = await core.generate(req(), timeout=5)
    assert result == Generation("Hello there, friend.", "Qwen2-7B-Instruct-GPTQ-Int4", "qwen2",
                                5, 7, FinishReason.EOS_TOKEN)
    assert backend.prompts[0].endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    # Registry default when the request leaves max_new_tokens unset.
    assert backend.params[0].max_new_tokens == 256


async def test_raw_scenario_skips_template():
    core, backend = make()
    await core.generate(req(inputs="<|im_start|>raw", scenario="raw"), timeout=5)
    assert backend.prompts == ["<|im_start|>raw"]


async def test_messages_use_template():
    core, backend = make()
    await core.generate(
        req(inputs="", messages=(Message("system", "S"), Message("user", "U"))), timeout=5
    )
    assert backend.prompts[0].startswith("<|im_start|>system\nS<|im_end|>")


async def test_stream_yields_chunks_then_result():
    core, _ = make()
    events = [e async for e in core.generate_stream(req(), timeout=5)]
    assert [e.text for e in events[:-1]] == ["Hello", " there", ",", " friend", "."]
    assert [e.tokens for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert all(isinstance(e, Chunk) for e in events[:-1])
    assert isinstance(events[-1], Generation) and events[-1].tokens == 5


async def test_alias_and_wrong_model():
    core, _ = make()
    await core.generate(req(model_id="Qwen2-7B-Instruct-GPTQ-Int4"), timeout=5)
    with pytest.raises(MeshError) as caught:
        await core.generate(req(model_id="llama3"), timeout=5)
    assert caught.value.reason is Reason.MODEL_NOT_FOUND


async def test_template_scenarios_belong_to_the_router():
    core, backend = make()
    with pytest.raises(MeshError) as caught:
        await core.generate(req(scenario="qa"), timeout=5)
    assert caught.value.violations[0].field == "scenario"
    assert backend.prompts == []


async def test_invalid_request_never_reaches_backend():
    core, backend = make()
    with pytest.raises(MeshError) as caught:
        await core.generate(req(inputs=""), timeout=5)
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert backend.prompts == []


async def test_limits_narrowed_by_backend_info():
    core, backend = make()
    backend.info_reply = EngineInfo("m", 100, 200, 2, 8)
    assert await core.refresh() is True
    assert core.limits.max_new_tokens == 199
    assert core.limits.max_stop_sequences == 2
    info = core.model_info()
    assert info.ready and info.engine_model == "m" and info.limits.max_total_tokens == 200


async def test_health_follows_backend():
    core, backend = make()
    assert await core.refresh()
    backend.healthy = False
    assert not await core.refresh()
    assert not core.model_info().ready
    backend.healthy = True
    assert await core.refresh()
    assert core.model_info().ready


async def test_overload_is_immediate():
    import asyncio

    core, _ = make(FakeBackend(delay=0.2), max_concurrency=1)
    first = asyncio.create_task(core.generate(req(), timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(MeshError) as caught:
        await core.generate(req(), timeout=5)
    assert caught.value.reason is Reason.OVERLOADED and caught.value.retry_after
    await first
    await core.generate(req(), timeout=5)  # the slot came back


async def test_backend_error_passes_through():
    core, _ = make(FakeBackend(fail=MeshError(Reason.MODEL_ERROR, "CUDA out of memory")))
    with pytest.raises(MeshError) as caught:
        await core.generate(req(), timeout=5)
    assert caught.value.reason is Reason.MODEL_ERROR


async def test_stream_closed_early_cancels_backend():
    core, backend = make()
    stream = core.generate_stream(req(), timeout=5)
    first = await anext(stream)
    assert first.text == "Hello"
    await stream.aclose()
    assert backend.cancelled == 1


@pytest.mark.parametrize("engine", ["tgi", "vllm"])
async def test_backend_up_names_the_engines_kind(engine: str):
    core, _ = make(engine_kind=engine)
    assert await core.refresh() is True
    labels = {"service": "adapter-test", "model": "qwen2", "backend": engine}
    assert core._metrics.registry.get_sample_value("llmmesh_backend_up", labels) == 1.0
