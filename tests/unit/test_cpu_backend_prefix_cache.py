"""Prefix caching in the CPU backend: slot choice, eviction, bounds, settings.

`SlotTable` is pure bookkeeping; the scheduler tests at the end drive it
through `BatchScheduler` over the recording model, so they see what each
decode step evaluates when a prompt's prefix is cached.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from services.cpu_backend.__main__ import build_settings, parse_args
from services.cpu_backend.prefix_cache import SlotTable, common_prefix
from services.cpu_backend.scheduler import BatchScheduler, SlotWork
from services.cpu_backend.settings import MAX_KV_SLOTS, BatchSettings
from tests.unit.test_cpu_backend_scheduler import RecordingModel, collect, params


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2], [1, 2, 3, 4], 2),
        ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], 2),
        ([7], [8], 0),
        (list(range(2000)), [*range(1234), -1, *range(1235, 2000)], 1234),
    ],
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n
    assert common_prefix(b, a) == n


def filled(*contents: list[int]) -> SlotTable:
    """A table whose slot i was released holding contents[i], in that order."""
    table = SlotTable(len(contents))
    for content in contents:
        lease = table.acquire([-1])
        table.release(lease.slot, content)
    return table


def test_the_free_slot_with_the_longest_shared_prefix_wins() -> None:
    table = filled([1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2, 9])
    lease = table.acquire([1, 2, 3, 4, 5, 7, 8])
    assert (lease.slot, lease.reused) == (1, 5)
    # What the slot holds until release is the reused part only.
    assert table.cached(1) == [1, 2, 3, 4, 5]


def test_a_busy_slot_is_never_chosen_however_long_its_prefix() -> None:
    table = filled([1, 2, 3, 4], [1, 2])
    first = table.acquire([1, 2, 3, 4, 5, 6])
    second = table.acquire([1, 2, 3, 4, 5, 6])
    assert (first.slot, first.reused) == (0, 4)
    assert (second.slot, second.reused) == (1, 2)
    with pytest.raises(LookupError):
        table.acquire([1])


def test_at_least_the_last_two_prompt_tokens_are_evaluated() -> None:
    table = filled([5, 6, 7, 8, 9])
    lease = table.acquire([5, 6, 7, 8])  # wholly cached, and more
    assert (lease.slot, lease.reused) == (0, 2)
    table.release(0, [5, 6, 7, 8, 9])
    assert table.acquire([5, 6]).reused == 0
    table.release(0, [5, 6, 7, 8, 9])
    assert table.acquire([5]).reused == 0


def test_a_short_shared_head_does_not_evict_a_long_cached_sequence() -> None:
    # Slot 1 holds a recent long conversation sharing only a template head
    # with the new prompt (<= 10% of what it holds): the least recently used
    # slot is taken instead, as llama-server's --slot-prompt-similarity does.
    conversation = [1, 2, *range(100, 130)]
    table = filled([50, 51], conversation)
    lease = table.acquire([1, 2, 3, 4])
    assert (lease.slot, lease.reused) == (0, 0)
    assert table.cached(1) == conversation


def test_idle_slots_are_reused_least_recently_used_first() -> None:
    table = SlotTable(3)
    # Never-used slots go first, lowest index first.
    leases = [table.acquire([i]) for i in (10, 20, 30)]
    assert [lease.slot for lease in leases] == [0, 1, 2]
    for slot in (1, 2, 0):  # released in this order
        table.release(slot, [100 + slot])
    order = []
    for _ in range(3):
        lease = table.acquire([7])  # shares nothing with any slot
        order.append(lease.slot)
        assert lease.reused == 0
    assert order == [1, 2, 0]


def test_among_equal_prefixes_the_least_recently_used_slot_wins() -> None:
    table = SlotTable(3)
    for _ in range(3):
        table.acquire([0])
    for slot in (2, 0, 1):
        table.release(slot, [1, 2, 3])
    assert table.acquire([1, 2, 3, 4]).slot == 2


def test_caching_off_takes_the_lowest_free_slot_and_reuses_nothing() -> None:
    table = SlotTable(3, enabled=False)
    a, b = table.acquire([1, 2, 3]), table.acquire([1, 2, 3])
    table.release(a.slot, [1, 2, 3])
    c = table.acquire([1, 2, 3])
    assert [a.slot, b.slot, c.slot] == [0, 1, 0]
    assert c.reused == 0 and table.cached(0) == []


def test_cache_slots_are_bounded() -> None:
    assert BatchSettings(max_batch_size=4).kv_slots == 4
    assert BatchSettings(max_batch_size=4, cache_slots=16).kv_slots == 16
    with pytest.raises(ValueError, match="cache_slots"):
        BatchSettings(max_batch_size=4, cache_slots=3)
    with pytest.raises(ValueError, match="cache_slots"):
        BatchSettings(max_batch_size=4, cache_slots=MAX_KV_SLOTS + 1)
    with pytest.raises(ValueError, match="prefix cache"):
        BatchSettings(max_batch_size=4, prefix_cache=False, cache_slots=8)
    with pytest.raises(ValueError):
        SlotTable(0)


def settings_from(*argv: str) -> tuple:
    args: argparse.Namespace = parse_args(list(argv))
    return build_settings(args, Path("model.gguf"))


def test_flags_size_the_kv_cache_for_every_cached_slot() -> None:
    _, batch, llama = settings_from(
        "--max-batch-size", "4", "--max-total-tokens", "1024", "--max-input-tokens", "512",
        "--prefix-cache-slots", "12",
    )  # fmt: skip
    assert (batch.max_batch_size, batch.kv_slots, batch.prefix_cache) == (4, 12, True)
    assert (llama.n_seq_max, llama.n_ctx) == (12, 12 * 1024)
    _, off, _ = settings_from("--prefix-cache", "off")
    assert off.prefix_cache is False
    # Flash attention stays off unless asked: its results depend on batch shape.
    assert llama.flash_attn is False
    assert settings_from("--flash-attn", "on")[2].flash_attn is True


def test_prefix_cache_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMMESH_PREFIX_CACHE", "off")
    monkeypatch.setenv("LLMMESH_PREFIX_CACHE_SLOTS", "9")
    args = parse_args([])
    assert (args.prefix_cache, args.prefix_cache_slots) == ("off", 9)


def test_max_client_batch_size_is_tgis_inputs_per_request_not_the_batch_size() -> None:
    # TGI's --max-client-batch-size (default 4) bounds the inputs of one
    # client request; it has nothing to do with --max-batch-size.
    server, batch, _ = settings_from("--max-batch-size", "16")
    assert (server.max_client_batch_size, batch.max_batch_size) == (4, 16)
    server, _, _ = settings_from("--max-batch-size", "16", "--max-client-batch-size", "2")
    assert server.max_client_batch_size == 2


# -- through the scheduler ---------------------------------------------------


def prefill_steps(model: RecordingModel) -> list[SlotWork]:
    return [w for step in model.steps for w in step if isinstance(w.tokens, list)]


async def test_a_repeated_prefix_is_not_prefilled_again() -> None:
    model = RecordingModel()
    sched = BatchScheduler(model, BatchSettings(max_batch_size=2))
    cached: list[int] = []
    try:
        first = await collect(sched, [1, 2, 3, 4, 5], 3)
        model.steps.clear()
        # Turn 2: turn 1's prompt, its answer, then new tokens.
        turn2 = [1, 2, 3, 4, 5, *(t.id for t in first), 8, 9]

        async def run() -> None:
            def started(cached_tokens: int = 0) -> None:
                cached.append(cached_tokens)

            async for _ in sched.generate_tokens(turn2, params(2), on_start=started):
                pass

        await run()
    finally:
        await sched.close()
    # The slot keeps the prefilled prompt, not the decoded answer (whose KV
    # a lone decode writes slightly differently): 5 reused, 5 prefilled.
    assert cached == [5]
    assert model.reused[-1] == 5
    assert prefill_steps(model) == [SlotWork(slot=0, tokens=turn2[5:], pos=5, sample=True)]


async def test_with_caching_off_every_prompt_is_prefilled_whole() -> None:
    model = RecordingModel()
    sched = BatchScheduler(model, BatchSettings(prefix_cache=False))
    try:
        await collect(sched, [1, 2, 3, 4], 2)
        model.steps.clear()
        await collect(sched, [1, 2, 3, 4, 5], 2)
    finally:
        await sched.close()
    assert model.reused == [0, 0]
    assert prefill_steps(model) == [SlotWork(slot=0, tokens=[1, 2, 3, 4, 5], pos=0, sample=True)]


async def test_more_cache_slots_than_batch_keep_idle_conversations_warm() -> None:
    model = RecordingModel(step_delay=0.002)
    sched = BatchScheduler(model, BatchSettings(max_batch_size=2, cache_slots=4))
    try:
        a = [1, 1, 1, 1, 1, 1]
        await collect(sched, a, 2)
        # Three other conversations, two at a time: the batch never exceeds
        # two, and they take the three other slots, leaving `a` cached.
        others = [[k, k, k, k, k, k] for k in (2, 3, 4)]
        running_max = 0

        async def watch() -> None:
            nonlocal running_max
            while True:
                running_max = max(running_max, sched.sizes()[1])
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(collect(sched, p, 4) for p in others))
        watcher.cancel()
        model.steps.clear()
        await collect(sched, [*a, 7, 8], 2)
    finally:
        await sched.close()
    assert running_max <= 2
    assert model.begun == [0, 1, 2, 3, 0]
    assert model.reused[-1] == len(a)


async def test_a_failed_step_drops_the_slots_cache() -> None:
    model = RecordingModel()
    sched = BatchScheduler(model, BatchSettings(max_batch_size=1))
    try:
        await collect(sched, [1, 2, 3], 2)
        model.fail_next_step = True
        with pytest.raises(Exception, match="decode failed"):
            await collect(sched, [1, 2, 3, 4, 5], 2)
        await collect(sched, [1, 2, 3, 4, 5], 2)
    finally:
        await sched.close()
    # Reused after the clean finish; after the failed decode, nothing is.
    assert model.reused == [0, 3, 0]
