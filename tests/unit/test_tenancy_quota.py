"""Reservation arithmetic, on the in-memory store.

Every test takes `make_store(clock)`; tests/integration/test_quota_redis.py
runs the same tests on the Redis store.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from services.common.errors import MeshError, Reason
from services.tenancy.quota import WINDOWS, QuotaStore
from services.tenancy.quota_memory import MemoryQuotaStore
from services.tenancy.tenants import Tenant, TenantLimits
from services.tenancy.usage import duration, ratelimit_headers

T0 = 1_800_000_000.0  # on a whole minute and a whole 5 minutes


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeStore = Callable[[Clock], QuotaStore]


@pytest.fixture
def make_store() -> MakeStore:
    return lambda clock: MemoryQuotaStore(clock)


def tenant(name: str = "t", **limits: int) -> Tenant:
    return Tenant(name, limits=TenantLimits(**limits))


async def refused(store: QuotaStore, who: Tenant, tokens: int) -> MeshError:
    with pytest.raises(MeshError) as caught:
        await store.reserve(who, tokens)
    return caught.value


async def test_tokens_per_minute_refuses_with_when_it_fits(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(tokens_per_minute=1000)
    await store.reserve(who, 600)
    clock.now += 20
    await store.reserve(who, 300)
    error = await refused(store, who, 200)
    assert error.reason is Reason.QUOTA_EXCEEDED and error.retryable
    assert error.code == "RESOURCE_EXHAUSTED" and error.http_status == 429
    # The 600 charged at T0 leave when their bucket does: 61 s after T0.
    assert error.retry_after == pytest.approx(41.0)
    assert error.metadata["limit_name"] == "tokens_per_minute"
    assert error.metadata["tenant"] == "t" and error.metadata["requested"] == "200"
    clock.now += 40.9
    await refused(store, who, 200)
    clock.now += 0.1
    await store.reserve(who, 200)
    await store.close()


async def test_a_request_larger_than_a_limit_can_never_fit(make_store):
    store = make_store(Clock())
    who = tenant(tokens_per_minute=1000, tokens_per_day=5000)
    error = await refused(store, who, 1001)
    assert error.reason is Reason.QUOTA_NEVER_FITS and not error.retryable
    assert error.retry_after is None and "never" in error.message
    assert error.http_status == 429
    # Nothing was charged by the refusal.
    await store.reserve(who, 1000)
    await store.close()


async def test_settle_returns_the_unused_part(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(tokens_per_minute=1000, tokens_per_day=1500)
    first = await store.reserve(who, 900)
    await refused(store, who, 200)
    assert await first.settle(250) == 0
    assert await first.settle(0) == 0  # once only
    await store.reserve(who, 750)  # 250 + 750 = 1000
    await refused(store, who, 1)
    clock.now += 61
    # The minute has room again, the day does not: 1000 of 1500 used.
    error = await refused(store, who, 600)
    assert error.metadata["limit_name"] == "tokens_per_day"
    await store.reserve(who, 500)
    await store.close()


async def test_release_gives_back_tokens_but_counts_the_request(make_store):
    store = make_store(Clock())
    who = tenant(tokens_per_minute=100, requests_per_minute=2)
    one = await store.reserve(who, 100)
    await one.release()
    await store.reserve(who, 100)
    error = await refused(store, who, 1)
    assert error.metadata["limit_name"] in ("requests_per_minute", "tokens_per_minute")
    usage = await store.usage(who)
    by_name = {w.name: w for w in usage.windows}
    assert by_name["requests_per_minute"].used == 2
    assert by_name["tokens_per_minute"].used == 100
    await store.close()


async def test_requests_per_minute(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(requests_per_minute=3)
    for _ in range(3):
        await store.reserve(who, 10)
        clock.now += 10
    error = await refused(store, who, 10)
    assert error.metadata["limit_name"] == "requests_per_minute"
    assert error.retry_after == pytest.approx(31.0)  # T0's bucket leaves at T0 + 61
    clock.now += 31
    await store.reserve(who, 10)
    await store.close()


async def test_concurrency(make_store):
    store = make_store(Clock())
    who = tenant(concurrent=2)
    one = await store.reserve(who, 5)
    two = await store.reserve(who, 5)
    assert two.concurrent == 2
    error = await refused(store, who, 5)
    assert error.reason is Reason.QUOTA_EXCEEDED
    assert error.metadata["limit_name"] == "concurrent" and error.retry_after == 1.0
    await one.settle(5)
    three = await store.reserve(who, 5)
    await two.release()
    await three.settle(5)
    assert (await store.usage(who)).concurrent == 0
    await store.close()


async def test_tenants_are_counted_apart(make_store):
    store = make_store(Clock())
    a, b = tenant("a", tokens_per_minute=100), tenant("b", tokens_per_minute=100)
    await store.reserve(a, 100)
    await store.reserve(b, 100)
    await refused(store, a, 1)
    await store.close()


async def test_windows_roll_over_bucket_by_bucket(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(tokens_per_minute=100)
    await store.reserve(who, 40)  # bucket T0
    clock.now += 30.5
    await store.reserve(who, 60)  # bucket T0 + 30
    await refused(store, who, 40)
    clock.now = T0 + 60.99  # T0's bucket still counts (a minute looks back 61 buckets)
    await refused(store, who, 40)
    clock.now = T0 + 61
    await store.reserve(who, 40)
    await refused(store, who, 1)
    clock.now = T0 + 91
    await store.reserve(who, 60)
    await store.close()


async def test_tokens_per_day_rolls_over(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(tokens_per_day=1000)
    await store.reserve(who, 700)
    clock.now += 3600
    await store.reserve(who, 300)
    error = await refused(store, who, 1)
    # The day's buckets are 5 minutes; T0's leaves 24 h 5 min after T0.
    assert error.retry_after == pytest.approx(86_400 + 300 - 3600)
    clock.now = T0 + 86_400 + 300
    await store.reserve(who, 700)
    await store.close()


async def test_no_minute_ever_sees_more_than_the_limit(make_store):
    """Random requests, settles and clock steps: in every 60 s span the tokens
    reserved (less what settling gave back) stay within the limit."""
    rng = random.Random(7)
    clock = Clock()
    store = make_store(clock)
    limit = 1000
    who = tenant(tokens_per_minute=limit)
    charges: list[tuple[float, int]] = []  # (time, tokens kept)
    for _ in range(400):
        clock.now += rng.choice((0.0, 0.3, 0.9, 1.7, 4.0, 13.0, 29.6))
        want = rng.randint(1, 400)
        try:
            reservation = await store.reserve(who, want)
        except MeshError as exc:
            assert exc.reason is Reason.QUOTA_EXCEEDED
            continue
        used = want if rng.random() < 0.7 else rng.randint(0, want)
        await reservation.settle(used)
        charges.append((clock.now, used))
    assert len(charges) > 50
    for start, _ in charges:
        span = sum(n for t, n in charges if start <= t < start + 60)
        assert span <= limit
    await store.close()


async def test_overshoot_is_reported_and_charged(make_store):
    store = make_store(Clock())
    who = tenant(tokens_per_minute=1000)
    reservation = await store.reserve(who, 100)
    assert await reservation.settle(130) == 30
    usage = await store.usage(who)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 130
    await store.close()


async def test_concurrent_reservations_never_exceed_the_limit(make_store):
    store = make_store(Clock())
    who = tenant(tokens_per_minute=1000, concurrent=40)
    results = await asyncio.gather(
        *(store.reserve(who, 30) for _ in range(64)), return_exceptions=True
    )
    granted = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, MeshError) for r in results if isinstance(r, BaseException))
    assert len(granted) == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
    await store.close()


async def test_usage_and_headers(make_store):
    clock = Clock()
    store = make_store(clock)
    who = tenant(requests_per_minute=10, tokens_per_minute=1000, concurrent=4)
    await store.reserve(who, 100)
    clock.now += 15
    reservation = await store.reserve(who, 200)
    usage = await store.usage(who)
    report = usage.as_dict()
    tpm = report["windows"]["tokens_per_minute"]  # type: ignore[index]
    assert tpm["used"] == 300 and tpm["remaining"] == 700 and tpm["limit"] == 1000
    assert tpm["frees_in_seconds"] == pytest.approx(46.0)
    assert tpm["resets_in_seconds"] == pytest.approx(61.0)
    assert report["concurrent"] == {"limit": 4, "in_flight": 2}
    assert report["windows"]["tokens_per_day"]["limit"] is None  # type: ignore[index]
    headers = ratelimit_headers(reservation)
    assert headers == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "1m1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "1m1s",
    }
    assert {w.name for w in usage.windows} == {w.name for w in WINDOWS}
    await store.close()


def test_durations_as_openai_writes_them():
    assert [duration(s) for s in (0.02, 1, 59.2, 360, 3723)] == [
        "20ms", "1s", "1m0s", "6m0s", "1h2m3s",
    ]


async def test_unlimited_tenants_are_counted_not_refused(make_store):
    store = make_store(Clock())
    who = tenant()
    for _ in range(5):
        await store.reserve(who, 10_000)
    usage = await store.usage(who)
    assert next(w for w in usage.windows if w.name == "tokens_per_day").used == 50_000
    await store.close()
