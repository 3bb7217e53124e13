"""The admission queue: priority bands, weighted fair share, FIFO, leaving."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.common.errors import MeshError, Reason
from services.tenancy.admission import AdmissionQueue
from services.tenancy.priority import Priority

BATCH, STANDARD, INTERACTIVE = Priority.BATCH, Priority.STANDARD, Priority.INTERACTIVE


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """Waiters that note, in order, who got a slot."""

    def __init__(self, queue: AdmissionQueue, band: Priority = STANDARD) -> None:
        self.queue = queue
        self.band = band  # the band of the slots drain() frees
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def add(self, label: str, tenant: str, priority: Priority, weight: float = 1.0,
            cost: float = 1.0) -> asyncio.Task[None]:
        async def wait() -> None:
            await self.queue.acquire(tenant, priority, weight=weight, cost=cost)
            self.order.append(label)

        task = asyncio.create_task(wait())
        self.tasks.append(task)
        return task

    async def drain(self, count: int) -> None:
        """Free `count` slots one at a time, letting each next waiter in."""
        for _ in range(count):
            self.queue.release(self.band)
            await settle()


async def full_queue(capacity: int = 1, **kwargs) -> AdmissionQueue:
    queue = AdmissionQueue("qwen2", capacity, **kwargs)
    for _ in range(capacity):
        await queue.acquire("holder", STANDARD)
    return queue


async def test_a_free_slot_is_taken_at_once_and_a_lone_tenant_gets_every_slot():
    queue = AdmissionQueue("qwen2", 4)
    waits = [await queue.acquire("nightly", BATCH) for _ in range(4)]
    assert waits == [0.0] * 4 and queue.in_use == 4 and queue.waiting == 0
    recorder = Recorder(queue)
    recorder.add("fifth", "nightly", BATCH)
    await settle()
    assert recorder.order == [] and queue.waiting == 1
    await recorder.drain(1)
    assert recorder.order == ["fifth"] and queue.in_use == 4


async def test_bands_go_strictly_by_priority():
    queue = await full_queue()
    recorder = Recorder(queue)
    for label, priority in (("b1", BATCH), ("s1", STANDARD), ("b2", BATCH), ("i1", INTERACTIVE),
                            ("s2", STANDARD), ("i2", INTERACTIVE)):
        recorder.add(label, label, priority)
        await settle()
    await recorder.drain(6)
    assert recorder.order == ["i1", "i2", "s1", "s2", "b1", "b2"]


async def test_first_come_first_served_within_a_tenant():
    queue = await full_queue()
    recorder = Recorder(queue)
    for i in range(6):
        recorder.add(f"a{i}", "a", STANDARD)
        recorder.add(f"b{i}", "b", STANDARD, weight=2)
        await settle()
    await recorder.drain(12)
    assert [x for x in recorder.order if x[0] == "a"] == [f"a{i}" for i in range(6)]
    assert [x for x in recorder.order if x[0] == "b"] == [f"b{i}" for i in range(6)]


@pytest.mark.parametrize(("cost_a", "cost_b", "weight_a", "weight_b", "share_b"), [
    (1, 1, 1, 3, 0.75),      # weights 1:3, requests
    (100, 100, 1, 3, 0.75),  # the same in tokens
    (100, 300, 1, 1, 0.25),  # equal weights, B's requests three times as dear
])
async def test_weighted_fair_share(cost_a, cost_b, weight_a, weight_b, share_b):
    queue = await full_queue(max_waiting=10_000)
    recorder = Recorder(queue)
    for i in range(400):
        recorder.add("a", "a", BATCH, weight=weight_a, cost=cost_a)
        recorder.add("b", "b", BATCH, weight=weight_b, cost=cost_b)
        if i % 50 == 0:
            await settle()
    await settle()
    await recorder.drain(400)
    counts = Counter(recorder.order)
    assert counts["b"] / 400 == pytest.approx(share_b, rel=0.10)
    # Over any 40 consecutive grants too, not only on the whole.
    for start in range(0, 400, 40):
        window = Counter(recorder.order[start:start + 40])
        assert window["b"] / 40 == pytest.approx(share_b, abs=0.05)
    for task in recorder.tasks:
        task.cancel()


async def test_an_idle_tenant_banks_no_credit():
    queue = AdmissionQueue("qwen2", 1, max_waiting=1000)
    recorder = Recorder(queue)
    await queue.acquire("a", BATCH)
    for _ in range(100):  # a is served alone for a while
        recorder.add("a", "a", BATCH)
        await settle()
        await recorder.drain(1)
    for _ in range(20):
        recorder.add("a", "a", BATCH)
        recorder.add("b", "b", BATCH)
    await settle()
    recorder.order.clear()
    await recorder.drain(20)
    counts = Counter(recorder.order)
    assert abs(counts["a"] - counts["b"]) <= 1  # b does not get 100 turns in a row


async def test_timeout_leaves_with_retry_info():
    queue = await full_queue(timeout=0.05)
    with pytest.raises(MeshError) as caught:
        await queue.acquire("a", STANDARD)
    error = caught.value
    assert error.reason is Reason.QUEUE_TIMEOUT and error.retryable
    assert error.code == "RESOURCE_EXHAUSTED" and error.http_status == 429
    assert error.retry_after is not None and error.retry_after >= 1
    assert queue.waiting == 0 and queue.in_use == 1
    # A freed slot then stays free: nobody is waiting for it.
    queue.release(STANDARD)
    assert queue.in_use == 0
    # A per-request timeout wins over the queue's.
    queue2 = await full_queue(timeout=30)
    with pytest.raises(MeshError):
        await queue2.acquire("a", STANDARD, timeout=0.01)


async def test_a_cancelled_waiter_leaves_at_once():
    queue = await full_queue(max_waiting=1)
    recorder = Recorder(queue)
    first = recorder.add("first", "a", STANDARD)
    await settle()
    assert queue.waiting == 1
    first.cancel()
    await settle()
    assert queue.waiting == 0
    # Its place is free for another, and the slot goes to that one.
    recorder.add("second", "a", STANDARD)
    await settle()
    await recorder.drain(1)
    assert recorder.order == ["second"] and queue.in_use == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_comes_back():
    queue = await full_queue()
    recorder = Recorder(queue)
    task = recorder.add("late", "a", STANDARD)
    await settle()
    queue.release(STANDARD)  # hands the slot over (the waiter has not run yet)
    task.cancel()
    await settle()
    assert task.cancelled()
    assert queue.in_use == 0 and queue.waiting == 0


async def test_a_full_queue_refuses_with_retry_info():
    queue = await full_queue(max_waiting=2)
    recorder = Recorder(queue)
    recorder.add("1", "a", STANDARD)
    recorder.add("2", "b", STANDARD)
    await settle()
    with pytest.raises(MeshError) as caught:
        await queue.acquire("c", INTERACTIVE)
    assert caught.value.reason is Reason.OVERLOADED
    assert caught.value.retry_after is not None and "qwen2" in caught.value.message
    for task in recorder.tasks:
        task.cancel()


async def test_capacity_changes():
    queue = await full_queue()
    recorder = Recorder(queue)
    for i in range(3):
        recorder.add(str(i), "a", STANDARD)
    await settle()
    queue.set_capacity(3)
    await settle()
    assert recorder.order == ["0", "1"] and queue.in_use == 3
    queue.set_capacity(1)  # nobody is pre-empted; slots empty as requests end
    await recorder.drain(2)
    assert recorder.order == ["0", "1"] and queue.in_use == 1
    await recorder.drain(1)
    assert recorder.order == ["0", "1", "2"] and queue.in_use == 1
    stats = queue.stats()
    assert (stats.capacity, stats.in_use, stats.waiting["standard"]) == (1, 1, 0)


async def test_slot_context_releases_and_reports_the_wait():
    queue = AdmissionQueue("qwen2", 1)
    async with queue.slot("a", STANDARD) as waited:
        assert waited == 0.0 and queue.in_use == 1
        other = asyncio.create_task(queue.acquire("b", STANDARD))
        await settle()
    waited_b = await other
    assert waited_b > 0.0 and queue.in_use == 1  # b's
    queue.release(STANDARD)
    with pytest.raises(RuntimeError):
        async with queue.slot("a", STANDARD, timeout=1):
            assert queue.in_use == 1
            raise RuntimeError("boom")
    assert queue.in_use == 0


async def test_waiters_that_left_do_not_pile_up():
    queue = await full_queue(timeout=0.001, max_waiting=10_000)
    for _ in range(300):
        with pytest.raises(MeshError):
            await queue.acquire("a", BATCH)
    band_heap = queue._bands[BATCH].heap  # the one internal this test looks at
    assert len(band_heap) <= 64 + 2 and queue.waiting == 0


async def test_many_requests_cancelling_and_timing_out_leak_nothing():
    """Random arrivals, holds, cancellations and timeouts: the slots in use never
    exceed the capacity, and at the end nothing is held or waiting."""
    import random

    rng = random.Random(3)
    queue = AdmissionQueue("qwen2", 3, max_waiting=40, timeout=0.02)
    peak = 0
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        nonlocal peak
        band = rng.choice(list(Priority))
        try:
            async with queue.slot(f"t{i % 5}", band, weight=1 + i % 3, cost=rng.randint(1, 50)):
                peak = max(peak, queue.in_use)
                assert queue.in_use <= queue.capacity
                await asyncio.sleep(rng.choice((0, 0.001, 0.005)))
            outcomes["served"] += 1
        except MeshError as exc:
            key = "timed out" if exc.reason is Reason.QUEUE_TIMEOUT else "queue full"
            outcomes[key] += 1

    tasks = []
    for i in range(400):
        tasks.append(asyncio.create_task(one(i)))
        if rng.random() < 0.1:
            rng.choice(tasks).cancel()
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice((0, 0.001)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert not [r for r in results if isinstance(r, Exception)]
    assert queue.in_use == 0 and queue.waiting == 0
    assert peak == 3 and outcomes["served"] > 50, outcomes
    assert outcomes["timed out"] and outcomes["cancelled"] and outcomes["queue full"], outcomes


class Engine:
    """A model whose slots generate one token per tick each, fed by tenants that
    keep `outstanding` requests of `size` tokens each in the queue (a flood)."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.active: list[list] = []  # [tenant, tokens left, band]
        self.served: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []

    def submit(self, tenant: str, size: int, weight: float = 1.0,
               priority: Priority = BATCH) -> asyncio.Task[None]:
        async def request() -> None:
            await self.queue.acquire(tenant, priority, weight=weight, cost=size)
            self.active.append([tenant, size, priority])

        task = asyncio.create_task(request())
        self.tasks.append(task)
        return task

    async def tick(self, resubmit: dict[str, tuple[int, float]]) -> list[str]:
        """One token for every running request; the tenants of those that ended."""
        await settle()
        ended = []
        for entry in self.active:
            entry[1] -= 1
            self.served[entry[0]] += 1
        for entry in [e for e in self.active if e[1] == 0]:
            self.active.remove(entry)
            self.queue.release(entry[2])
            ended.append(entry[0])
            if entry[0] in resubmit:
                self.submit(entry[0], *resubmit[entry[0]])
        return ended

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


@pytest.mark.parametrize(("size_a", "size_b"), [(64, 64), (32, 256)])
async def test_two_flooding_tenants_share_tokens_by_weight(size_a, size_b):
    """Weights 1:3 give tokens 1:3 within 10%, whatever the requests' sizes."""
    engine = Engine(AdmissionQueue("qwen2", 8, max_waiting=1000))
    flows = {"a": (size_a, 1.0), "b": (size_b, 3.0)}
    for tenant, (size, weight) in flows.items():
        for _ in range(16):
            engine.submit(tenant, size, weight)
    for _ in range(300):  # warm up
        await engine.tick(flows)
    engine.served.clear()
    for _ in range(3000):
        await engine.tick(flows)
    share_b = engine.served["b"] / (engine.served["a"] + engine.served["b"])
    assert share_b == pytest.approx(0.75, rel=0.10)
    assert engine.queue.in_use == 8  # work conserving: every slot busy throughout
    engine.stop()


async def test_an_interactive_request_waits_for_one_slot_not_the_flood():
    engine = Engine(AdmissionQueue("qwen2", 8, max_waiting=1000))
    flood = {"nightly": (128, 1.0)}
    for _ in range(80):  # ten times the model's slots
        engine.submit("nightly", 128)
    for _ in range(50):
        await engine.tick(flood)
    asked = engine.submit("search", 16, priority=INTERACTIVE)
    waited = 0
    while not any(e[0] == "search" for e in engine.active):
        await engine.tick(flood)
        waited += 1
    # The next slot to free is its own: at most one flood request's length.
    assert waited <= 128
    assert asked.done()
    engine.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_lone_batch_tenant_gets_the_whole_model_despite_headroom():
    queue = AdmissionQueue("qwen2", 4, headroom=2)
    for _ in range(4):
        assert await queue.acquire("nightly", BATCH) == 0.0
    assert queue.in_use == 4 and queue.held == 0


async def test_headroom_holds_the_slots_urgent_bands_used_lately():
    """Batch fills the model less what interactive used within `memory`; an
    interactive request then starts at once in a held slot; once no urgent
    request has come for `memory` seconds, batch may take every slot again."""
    clock = Clock()
    queue = AdmissionQueue("qwen2", 4, headroom=2, memory=10.0, clock=clock)
    assert await queue.acquire("search", INTERACTIVE) == 0.0
    assert queue.held == 1
    for _ in range(3):
        assert await queue.acquire("nightly", BATCH) == 0.0
    queue.release(INTERACTIVE)
    recorder = Recorder(queue, band=BATCH)
    recorder.add("batch-4", "nightly", BATCH)
    await settle()
    # The slot interactive used stays held: batch waits although it is free.
    assert queue.in_use == 3 and queue.waiting == 1 and queue.held == 1
    clock.now += 5
    assert await asyncio.wait_for(queue.acquire("search", INTERACTIVE), 0.5) == 0.0
    queue.release(INTERACTIVE)
    await settle()
    assert recorder.order == [] and queue.in_use == 3
    clock.now += 10.5  # no urgent request for longer than `memory`
    assert queue.held == 0
    queue.release(BATCH)  # a batch one ends: the waiting one and the freed slot fill
    await settle()
    assert recorder.order == ["batch-4"] and queue.in_use == 3
    assert await queue.acquire("nightly", BATCH) == 0.0
    assert queue.in_use == 4


async def test_headroom_follows_the_peak_and_stays_within_its_bound():
    clock = Clock()
    queue = AdmissionQueue("qwen2", 8, headroom=2, memory=10.0, clock=clock)
    for _ in range(3):
        await queue.acquire("search", INTERACTIVE)
    assert queue.held == 2  # three at once, but at most `headroom`
    for _ in range(3):
        queue.release(INTERACTIVE)
    await queue.acquire("api", STANDARD)  # standard counts as urgent too
    clock.now += 10.5
    assert queue.held == 1  # the old peak has left the memory; one still runs
    for _ in range(7):
        await queue.acquire("nightly", BATCH)
    assert queue.in_use == 8
    clock.now += 5
    queue.release(STANDARD)  # it held its slot until now: held a while longer
    clock.now += 9
    assert queue.held == 1
    clock.now += 2
    assert queue.held == 0


async def test_a_free_slot_held_from_batch_opens_when_the_memory_lapses():
    """No slot stays free while batch waits once nothing is held any more,
    even when no request ends to wake the queue."""
    queue = AdmissionQueue("qwen2", 2, headroom=1, memory=0.05)
    await queue.acquire("search", INTERACTIVE)
    await queue.acquire("nightly", BATCH)
    queue.release(INTERACTIVE)
    waiter = asyncio.create_task(queue.acquire("nightly", BATCH))
    await settle()
    assert not waiter.done() and queue.in_use == 1
    assert await asyncio.wait_for(waiter, 2.0) > 0.0
    assert queue.in_use == 2


async def test_headroom_never_starves_batch_of_its_last_slot():
    queue = AdmissionQueue("qwen2", 1, headroom=4)
    await queue.acquire("search", INTERACTIVE)
    queue.release(INTERACTIVE)
    assert queue.held == 1
    assert await queue.acquire("nightly", BATCH) == 0.0
