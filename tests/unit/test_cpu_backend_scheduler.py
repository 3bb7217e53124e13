"""The continuous-batching scheduler over a recording model (no llama.cpp).

`RecordingModel` is a `BatchModel` that answers each sampled slot with the
position it sampled at and records every step, so the tests can see what
the engine thread put into each decode: who joined when, prefill chunks,
the batch size and token budget, and what was freed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from services.cpu_backend.engine import EngineError, SamplingParams, Token
from services.cpu_backend.scheduler import BatchScheduler, SlotWork
from services.cpu_backend.settings import BatchSettings

EOS = 0


class RecordingModel:
    """Token id = 1000 + position sampled at; EOS once a slot reaches `eos_after`."""

    def __init__(self, step_delay: float = 0.0, eos_after: int | None = None) -> None:
        self.steps: list[list[SlotWork]] = []
        self.begun: list[int] = []
        self.reused: list[int] = []
        self.ended: list[int] = []
        self.step_delay = step_delay
        self.eos_after = eos_after
        self.fail_next_step = False
        self.fail_slot: int | None = None
        self.release = threading.Event()
        self.release.set()
        self._count: dict[int, int] = {}

    model_id = "recording"
    context_length = 4096

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return [chr(i) for i in ids]

    def begin(
        self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, reused: int = 0
    ) -> int:
        self.begun.append(slot)
        self.reused.append(reused)
        self._count[slot] = 0
        return reused

    def step(self, work: Sequence[SlotWork]) -> dict[int, Token | Exception]:
        self.release.wait()
        if self.step_delay:
            threading.Event().wait(self.step_delay)
        self.steps.append(list(work))
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("decode failed")
        out: dict[int, Token | Exception] = {}
        for item in work:
            if not item.sample:
                continue
            if item.slot == self.fail_slot:
                self.fail_slot = None  # once: the slot is reused afterwards
                out[item.slot] = ValueError("grammar dead end")
                continue
            self._count[item.slot] += 1
            pos = item.pos + len(item.tokens) - 1
            eos = self.eos_after is not None and self._count[item.slot] >= self.eos_after
            out[item.slot] = Token(
                id=EOS if eos else 1000 + pos, text="x", logprob=-0.1, special=eos, eos=eos
            )
        return out

    def end(self, slot: int, keep_kv: bool = False) -> None:
        self.ended.append(slot)

    def close(self) -> None:
        return None


def params(max_new_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)


async def collect(sched: BatchScheduler, prompt: list[int], n: int) -> list[Token]:
    return [t async for t in sched.generate_tokens(prompt, params(n))]


@pytest.fixture
def model() -> RecordingModel:
    return RecordingModel()


async def test_one_request_prefills_then_decodes_one_token_per_step(model: RecordingModel) -> None:
    sched = BatchScheduler(model, BatchSettings())
    try:
        tokens = await collect(sched, [5, 6, 7], 3)
    finally:
        await sched.close()
    # Prefill samples at position 2; each decode feeds the last token back.
    assert [t.id for t in tokens] == [1002, 1003, 1004]
    assert model.steps[0] == [SlotWork(slot=0, tokens=[5, 6, 7], pos=0, sample=True)]
    assert model.steps[1] == [SlotWork(slot=0, tokens=(1002,), pos=3, sample=True)]
    assert model.steps[2] == [SlotWork(slot=0, tokens=(1003,), pos=4, sample=True)]
    assert len(model.steps) == 3
    assert model.ended == [0]


async def test_concurrent_requests_share_decode_steps(model: RecordingModel) -> None:
    model.release.clear()
    sched = BatchScheduler(model, BatchSettings(max_batch_size=4))
    try:
        tasks = [asyncio.create_task(collect(sched, [1, 2], 5)) for _ in range(4)]
        await asyncio.sleep(0.05)
        model.release.set()
        results = await asyncio.gather(*tasks)
    finally:
        await sched.close()
    assert all(len(r) == 5 for r in results)
    # However the first step happened to start, once all four run every step
    # decodes all four: 4 requests x 5 tokens in far fewer than 20 steps.
    assert max(len(step) for step in model.steps) == 4
    assert len(model.steps) <= 7


async def test_batch_size_bounds_the_running_batch_and_others_wait(model: RecordingModel) -> None:
    model.step_delay = 0.002
    sched = BatchScheduler(model, BatchSettings(max_batch_size=2))
    try:
        results = await asyncio.gather(*(collect(sched, [1], 3) for _ in range(5)))
    finally:
        await sched.close()
    assert [len(r) for r in results] == [3] * 5
    assert max(len(step) for step in model.steps) <= 2
    assert sorted(model.begun) == sorted(model.ended)
    assert set(model.begun) == {0, 1}


async def test_token_budget_holds_back_a_request_that_does_not_fit(model: RecordingModel) -> None:
    model.step_delay = 0.002
    # Each request reserves 10 prompt + 10 new tokens; 30 holds only one.
    sched = BatchScheduler(model, BatchSettings(max_batch_size=4, max_batch_total_tokens=30))
    try:
        await asyncio.gather(*(collect(sched, list(range(1, 11)), 10) for _ in range(2)))
    finally:
        await sched.close()
    assert max(len(step) for step in model.steps) == 1


async def test_long_prompts_are_prefilled_in_chunks_beside_running_streams(
    model: RecordingModel,
) -> None:
    model.step_delay = 0.002
    sched = BatchScheduler(model, BatchSettings(max_batch_prefill_tokens=4))
    try:
        running = asyncio.create_task(collect(sched, [1], 30))
        await asyncio.sleep(0.01)
        await collect(sched, list(range(1, 11)), 1)
        await running
    finally:
        await sched.close()
    chunks = [w.tokens for step in model.steps for w in step if len(w.tokens) > 1 or w.pos == 0]
    assert [len(c) for c in chunks if len(c) > 1] == [4, 4, 2]
    # Every chunk step also decoded the running stream.
    for step in model.steps:
        if any(len(w.tokens) > 1 for w in step):
            assert any(len(w.tokens) == 1 and w.sample for w in step)


async def test_waiting_served_ratio_holds_newcomers_back_until_enough_wait(
    model: RecordingModel,
) -> None:
    model.step_delay = 0.003
    settings = BatchSettings(waiting_served_ratio=2.0, max_waiting_tokens=5)
    sched = BatchScheduler(model, settings)
    try:
        running = asyncio.create_task(collect(sched, [1], 40))
        await asyncio.sleep(0.02)
        first_step = len(model.steps)
        await collect(sched, [2], 1)
        joined = next(
            i for i, step in enumerate(model.steps) if any(w.tokens == [2] for w in step)
        )
        running.cancel()
    finally:
        await sched.close()
    # One running, ratio 2: a lone newcomer waits max_waiting_tokens steps.
    assert joined - first_step >= 5


async def test_cancelled_stream_leaves_the_batch_and_frees_its_slot(model: RecordingModel) -> None:
    model.step_delay = 0.002
    sched = BatchScheduler(model, BatchSettings(max_batch_size=2))
    try:
        stream = sched.generate_tokens([1], params(1000))
        first = await anext(stream)
        assert first.id == 1000
        other = asyncio.create_task(collect(sched, [1], 20))
        await asyncio.sleep(0.01)
        await stream.aclose()
        await other
        waiting, running = sched.sizes()
    finally:
        await sched.close()
    assert (waiting, running) == (0, 0)
    assert sorted(model.ended) == [0, 1]
    # Far fewer than the 1000 tokens asked for were ever decoded.
    assert sum(len(s) for s in model.steps) < 200


async def test_eos_ends_a_sequence_early(model: RecordingModel) -> None:
    model.eos_after = 2
    sched = BatchScheduler(model, BatchSettings())
    try:
        tokens = await collect(sched, [1], 10)
    finally:
        await sched.close()
    assert [t.eos for t in tokens] == [False, True]


async def test_failed_decode_fails_every_running_request(model: RecordingModel) -> None:
    model.release.clear()
    sched = BatchScheduler(model, BatchSettings())
    try:
        tasks = [asyncio.create_task(collect(sched, [1], 3)) for _ in range(2)]
        await asyncio.sleep(0.02)
        model.fail_next_step = True
        model.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, EngineError) for r in results)
        assert not await sched.health()
        # The engine recovers: the next request is served.
        assert len(await collect(sched, [1], 2)) == 2
        assert await sched.health()
    finally:
        await sched.close()


async def test_a_per_sequence_error_fails_only_that_request(model: RecordingModel) -> None:
    model.release.clear()
    sched = BatchScheduler(model, BatchSettings())
    try:
        bad = asyncio.create_task(collect(sched, [1], 3))
        await asyncio.sleep(0.02)
        good = asyncio.create_task(collect(sched, [2], 3))
        await asyncio.sleep(0.02)
        model.fail_slot = 0
        model.release.set()
        bad_result, good_result = await asyncio.gather(bad, good, return_exceptions=True)
    finally:
        await sched.close()
    assert isinstance(bad_result, EngineError)
    assert isinstance(good_result, list) and len(good_result) == 3


async def test_on_start_marks_joining_the_batch(model: RecordingModel) -> None:
    model.release.clear()
    sched = BatchScheduler(model, BatchSettings(max_batch_size=1))
    started: list[str] = []
    try:

        async def run(name: str) -> None:
            def on_start(cached_tokens: int = 0) -> None:
                started.append(name)

            async for _ in sched.generate_tokens([1], params(2), on_start=on_start):
                pass

        a = asyncio.create_task(run("a"))
        await asyncio.sleep(0.02)
        b = asyncio.create_task(run("b"))
        await asyncio.sleep(0.02)
        assert sched.sizes() == (1, 1)
        model.release.set()
        await asyncio.gather(a, b)
    finally:
        await sched.close()
    assert started == ["a", "b"]


async def test_closed_scheduler_refuses_new_work(model: RecordingModel) -> None:
    sched = BatchScheduler(model, BatchSettings())
    await sched.close()
    with pytest.raises(EngineError):
        await collect(sched, [1], 1)


@pytest.mark.parametrize("prefix_cache", [True, False])
async def test_decode_tokens_go_in_slot_order_and_the_freed_slot_is_reused(
    prefix_cache: bool,
) -> None:
    # llama.cpp runs one compute pass per run of consecutive sequence ids in
    # a batch: never-used slots go lowest first, a newcomer takes back the
    # freed slot 0 (its cached prefix with the cache on, the lowest free
    # slot with it off), and each step lists the decode tokens by slot,
    # whatever the order the requests joined in.
    model = RecordingModel(step_delay=0.01)
    sched = BatchScheduler(model, BatchSettings(max_batch_size=4, prefix_cache=prefix_cache))
    try:
        short = asyncio.create_task(collect(sched, [1, 2], 2))
        await asyncio.sleep(0)
        longs = [asyncio.create_task(collect(sched, [1, 2], 20)) for _ in range(2)]
        await short
        await collect(sched, [1, 2], 3)
        await asyncio.gather(*longs)
    finally:
        await sched.close()
    assert model.begun == [0, 1, 2, 0]
    decode_orders = [[w.slot for w in step if isinstance(w.tokens, tuple)] for step in model.steps]
    assert [0, 1, 2] in decode_orders  # the newcomer in slot 0 beside slots 1 and 2
    assert all(order == sorted(order) for order in decode_orders)
