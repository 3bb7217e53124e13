"""A stream broken after its first text continues on another replica."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.engines.base import EngineResult, EngineToken, Prompt
from services.common.errors import MeshError, Reason
from services.common.types import FinishReason, Parameters
from services.openai.app import OpenAIFace, OpenAISettings
from services.openai.server import start_listener
from tests.fakes.backend import FakeBackend

ANSWER = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
FULL = "".join(ANSWER)


@dataclass
class Continuing(FakeBackend):
    """Produces ANSWER after whatever start of it the prompt already ends with,
    as a greedy model continues its own text; breaks after `fail_after` tokens."""

    def __post_init__(self) -> None:
        self.words = ANSWER

    async def generate_stream(
        self, prompt: Prompt, params: Parameters, timeout: float | None
    ) -> AsyncIterator[EngineToken | EngineResult]:
        assert isinstance(prompt, str)
        self.prompts.append(prompt)
        self.params.append(params)
        done = max(i for i in range(len(ANSWER) + 1) if prompt.endswith("".join(ANSWER[:i])))
        words = ANSWER[done:][: params.max_new_tokens]
        for i, word in enumerate(words):
            if self.fail is not None and (self.fail_after or 0) <= i:
                raise self.fail
            yield EngineToken(word)
        finish = FinishReason.EOS_TOKEN if done + len(words) == len(ANSWER) else FinishReason.LENGTH
        yield EngineResult("".join(words), len(words), self.input_tokens + done, finish)


def broken(after: int = 3) -> Continuing:
    return Continuing(
        fail=MeshError(Reason.INCOMPLETE_GENERATION, "the engine closed the stream"),
        fail_after=after,
    )


def request(**kw) -> pb.GenerateStreamRequest:
    params = kw.pop("parameters", {})
    return pb.GenerateStreamRequest(
        model_id="qwen2", inputs="Say the pangram.",
        parameters=pb.GenerationParameters(**params), **kw,
    )


async def stream(router, message, metadata=()) -> list[pb.GenerateStreamResponse]:
    call = router.stub.GenerateStream(message, timeout=10, metadata=metadata)
    return [m async for m in call]


async def test_greedy_stream_resumes_with_one_finish_and_counts_that_add_up(
    start_adapter, start_router
):
    first, second = broken(3), Continuing()
    a = await start_adapter("qwen2", first)
    b = await start_adapter("qwen2", second)
    router = await start_router({"qwen2": [a.address, b.address]})
    router.core._pools["qwen2"].pick = _first_untried(a.address, router)  # type: ignore[method-assign]
    replies = await stream(router, request())
    texts = [m.text for m in replies[:-1]]
    assert "".join(texts) == FULL  # neither doubled nor cut at the seam
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert not last.HasField("error")
    assert (last.generated_text, last.tokens, last.resumes) == (FULL, len(ANSWER), 1)
    assert last.input_tokens == 7  # the continuation's prompt less the relayed tokens
    assert [m.tokens for m in replies[:-1]] == list(range(1, len(ANSWER) + 1))
    # The second replica continued the open assistant turn with the rest of the budget.
    prompt = second.prompts[-1]
    assert prompt.endswith("<|im_start|>assistant\n" + "".join(ANSWER[:3]))
    assert second.params[-1].max_new_tokens == 256 - 3
    resumes = router.metrics.resumes.labels("router", "qwen2", "incomplete_generation")
    assert resumes._value.get() == 1


async def test_a_stop_sequence_split_by_the_seam_ends_the_stream(start_adapter, start_router):
    """" brown" was relayed before the break, " fox" came after: no engine saw
    the stop sequence whole, so the router ends the stream where it ends."""
    router = await first_breaks(start_adapter, start_router)
    replies = await stream(router, request(parameters={"stop": [" brown fox"]}))
    assert "".join(m.text for m in replies[:-1]) == "The quick brown fox"
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and not last.HasField("error")
    assert (last.generated_text, last.tokens, last.resumes) == ("The quick brown fox", 4, 1)
    assert last.input_tokens > 0  # the request's, as the replica counts them
    # With a stop sequence that never forms, the same break resumes to the end.
    router = await first_breaks(start_adapter, start_router)
    replies = await stream(router, request(parameters={"stop": [" lazy cat"]}))
    assert replies[-1].generated_text == FULL
    # The OpenAI face leaves the matched stop sequence out, as OpenAI does.
    router = await first_breaks(start_adapter, start_router)
    events = await openai_stream(router, {
        "messages": [{"role": "user", "content": "Say the pangram."}], "stop": [" brown fox"]})
    text = "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if e.get("choices"))
    assert text == "The quick"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def first_breaks(start_adapter, start_router, first=None, second=None):
    """A router over two replicas of qwen2 that tries `first` (by default one
    that breaks after three tokens) before `second` (one that continues)."""
    first = first if first is not None else broken(3)
    a = await start_adapter("qwen2", first)
    b = await start_adapter("qwen2", second if second is not None else Continuing())
    router = await start_router({"qwen2": [a.address, b.address]})
    router.core._pools["qwen2"].pick = _first_untried(a.address, router)  # type: ignore[method-assign]
    return router


def _first_untried(address: str, router):
    """A pick that takes the replica at `address` first, then any other."""
    pool = router.core._pools["qwen2"]

    def pick(exclude, request=None):
        candidates = [r for r in pool.replicas.values() if r.serving and r not in exclude]
        candidates.sort(key=lambda r: r.address != address)
        return candidates[0] if candidates else None

    return pick


async def sampled_case(start_adapter, start_router, **kw):
    first, second = broken(2), Continuing()
    a = await start_adapter("qwen2", first)
    b = await start_adapter("qwen2", second)
    router = await start_router({"qwen2": [a.address, b.address]})
    router.core._pools["qwen2"].pick = _first_untried(a.address, router)  # type: ignore[method-assign]
    return await stream(router, request(**kw.get("req", {})), kw.get("metadata", ())), second


async def test_sampled_stream_without_opt_in_keeps_its_in_band_error(start_adapter, start_router):
    replies, second = await sampled_case(
        start_adapter, start_router, req={"parameters": {"do_sample": True, "temperature": 0.7}}
    )
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_ERROR
    assert last.error.reason == "INCOMPLETE_GENERATION"
    assert not second.prompts


async def test_sampled_stream_resumes_on_opt_in_by_field_or_header(start_adapter, start_router):
    sampled = {"do_sample": True, "temperature": 0.7}
    by_field, _ = await sampled_case(
        start_adapter, start_router,
        req={"parameters": sampled, "resume": pb.RESUME_POLICY_ALLOW},
    )
    by_header, _ = await sampled_case(
        start_adapter, start_router, req={"parameters": sampled},
        metadata=(("x-llmmesh-resume", "allow"),),
    )
    for replies in (by_field, by_header):
        assert replies[-1].generated_text == FULL and replies[-1].resumes == 1


async def test_a_request_that_asks_for_no_resume_gets_none(start_adapter, start_router):
    replies, second = await sampled_case(
        start_adapter, start_router, req={"resume": pb.RESUME_POLICY_NEVER}
    )
    assert replies[-1].error.reason == "INCOMPLETE_GENERATION" and not second.prompts
    header, second = await sampled_case(
        start_adapter, start_router, metadata=(("x-llmmesh-resume", "never"),)
    )
    assert header[-1].error.reason == "INCOMPLETE_GENERATION" and not second.prompts


async def test_a_bad_resume_header_is_invalid(start_adapter, start_router):
    a = await start_adapter("qwen2", Continuing())
    router = await start_router({"qwen2": [a.address]})
    try:
        await stream(router, request(), (("x-llmmesh-resume", "sometimes"),))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-llmmesh-resume" in (exc.details() or "")
    else:
        raise AssertionError("a bad header was accepted")


async def test_resumes_are_bounded(start_adapter, start_router):
    backends = [broken(2), broken(2), broken(2), Continuing()]
    adapters = [await start_adapter("qwen2", b) for b in backends]
    router = await start_router({"qwen2": [x.address for x in adapters]})
    router.core._max_resumes = 2
    order = [x.address for x in adapters]
    pool = router.core._pools["qwen2"]

    def pick(exclude, request=None):
        left = [r for r in pool.replicas.values() if r.serving and r not in exclude]
        left.sort(key=lambda r: order.index(r.address))
        return left[0] if left else None

    pool.pick = pick  # type: ignore[method-assign]
    replies = await stream(router, request())
    last = replies[-1]
    # Two resumes, each broken after two more tokens: the third break ends it.
    assert last.finish_reason == pb.FINISH_REASON_ERROR
    assert "".join(m.text for m in replies[:-1]) == "".join(ANSWER[:6])
    assert not backends[3].prompts


async def openai_stream(router, body: dict, headers: dict | None = None) -> list[dict]:
    settings = OpenAISettings(port=0, request_timeout=10, grace_seconds=1)
    listener = await start_listener(OpenAIFace(router.core, router.metrics, settings), settings)
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"http://127.0.0.1:{listener.port}/v1/chat/completions",
                json={"model": "qwen2", "stream": True, **body}, headers=headers or {})
            assert resp.status == 200
            events = []
            async for line in resp.content:
                text = line.decode().strip()
                if text.startswith("data: {"):
                    events.append(json.loads(text.removeprefix("data: ")))
            return events
    finally:
        await listener.stop()


async def test_openai_face_streams_resume_too(start_adapter, start_router):
    messages = [{"role": "user", "content": "Say the pangram."}]
    for body, headers, resumed in (
        ({"messages": messages}, None, True),
        ({"messages": messages, "temperature": 0.7}, None, False),
        ({"messages": messages, "temperature": 0.7}, {"x-llmmesh-resume": "allow"}, True),
    ):
        first, second = broken(3), Continuing()
        a = await start_adapter("qwen2", first)
        b = await start_adapter("qwen2", second)
        router = await start_router({"qwen2": [a.address, b.address]})
        router.core._pools["qwen2"].pick = _first_untried(a.address, router)  # type: ignore[method-assign]
        events = await openai_stream(router, body, headers)
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e.get("choices"))
        if resumed:
            assert text == FULL
            assert events[-1]["choices"][0]["finish_reason"] == "stop"
            assert events[-1]["resumes"] == 1
        else:
            assert text == "".join(ANSWER[:3])
            assert events[-1]["error"]["code"] == "incomplete_generation"


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


async def test_a_stream_that_sent_tool_calls_is_not_resumed(start_adapter, start_router):
    """A continuation would start its calls anew, and the client would get
    each call's deltas twice: the stream ends with its in-band error."""
    two = CALL + "\n" + CALL.replace("Oslo", "Bergen")
    pieces = [two[i:i + 4] for i in range(0, len(two), 4)]
    # Broken after the first call ends: its deltas have reached the client.
    cut = next(i for i in range(len(pieces)) if "</tool_call>" in "".join(pieces[:i]))
    first = FakeBackend(words=pieces, fail_after=cut, fail=MeshError(
        Reason.INCOMPLETE_GENERATION, "the engine closed the stream"))
    second = FakeBackend(words=pieces)
    router = await first_breaks(start_adapter, start_router, first, second)
    events = await openai_stream(router, {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER]})
    deltas = [d for e in events if e.get("choices")
              for d in e["choices"][0]["delta"].get("tool_calls") or ()]
    assert deltas and deltas[0]["function"]["name"] == "get_weather"  # the call had begun
    assert events[-1]["error"]["code"] == "incomplete_generation"
    assert not second.prompts
