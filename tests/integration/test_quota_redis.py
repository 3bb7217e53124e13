"""The Redis quota store against a real redis-server started here.

It passes every test of the in-memory store (imported below, run with a
`make_store` that builds Redis stores), keeps one budget across two stores
(two routers), and follows its policy when Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from services.common.errors import MeshError, Reason
from services.tenancy.quota_redis import FailurePolicy, RedisQuotaStore
from tests.harness.procs import free_port, start, stop
from tests.unit.test_tenancy_quota import (  # noqa: F401  (run here on Redis)
    Clock,
    tenant,
    test_a_request_larger_than_a_limit_can_never_fit,
    test_concurrency,
    test_concurrent_reservations_never_exceed_the_limit,
    test_no_minute_ever_sees_more_than_the_limit,
    test_overshoot_is_reported_and_charged,
    test_release_gives_back_tokens_but_counts_the_request,
    test_requests_per_minute,
    test_settle_returns_the_unused_part,
    test_tenants_are_counted_apart,
    test_tokens_per_day_rolls_over,
    test_tokens_per_minute_refuses_with_when_it_fits,
    test_unlimited_tenants_are_counted_not_refused,
    test_usage_and_headers,
    test_windows_roll_over_bucket_by_bucket,
)

pytestmark = pytest.mark.integration


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server not listening on {port} after {timeout}s")


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = start([
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no",
    ])
    _wait_port(port, proc)
    return proc


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis)")
    port = free_port()
    proc = _redis_server(port)
    yield port
    stop(proc)


@pytest.fixture
def make_store(redis_port, request):
    """Redis stores on one fresh key prefix per test."""
    stores: list[RedisQuotaStore] = []
    prefix = f"test:{request.node.name}:{time.monotonic_ns()}:"

    def make(clock=None, **kwargs):
        store = RedisQuotaStore(
            f"redis://127.0.0.1:{redis_port}", prefix=prefix, clock=clock, **kwargs
        )
        stores.append(store)
        return store

    return make


async def test_two_routers_keep_one_budget(make_store):
    """64 concurrent reservations through two stores (two routers): exactly as
    many as fit are granted, and settling gives the rest back to both."""
    clock = Clock()
    one, two = make_store(clock), make_store(clock)
    who = tenant(tokens_per_minute=1000, concurrent=50)
    results = await asyncio.gather(
        *((one if i % 2 else two).reserve(who, 30) for i in range(64)), return_exceptions=True
    )
    granted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(granted) == 33 and sum(r.tokens for r in granted) == 990
    assert all(isinstance(e, MeshError) and e.reason is Reason.QUOTA_EXCEEDED
               for e in refused)
    assert {r.store for r in granted} == {one, two}
    # Each settles for a third of its reservation: 660 tokens come back.
    await asyncio.gather(*(r.settle(10) for r in granted))
    usage = await one.usage(who)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 330
    assert usage.concurrent == 0
    again = await asyncio.gather(
        *((one if i % 2 else two).reserve(who, 30) for i in range(40)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in again) == 22  # 330 + 660 <= 1000
    await one.close()
    await two.close()


async def test_concurrency_across_routers(make_store):
    one, two = make_store(Clock()), make_store(Clock())
    who = tenant(concurrent=3)
    held = [await one.reserve(who, 1), await two.reserve(who, 1), await one.reserve(who, 1)]
    with pytest.raises(MeshError):
        await two.reserve(who, 1)
    await held[0].settle(1)
    await two.reserve(who, 1)
    await one.close()
    await two.close()


async def test_redis_clock_by_default(make_store):
    """Without a clock the script takes Redis's TIME."""
    store = make_store(None)
    who = tenant(tokens_per_minute=100)
    await store.reserve(who, 60)
    with pytest.raises(MeshError) as caught:
        await store.reserve(who, 60)
    assert 59 <= caught.value.retry_after <= 61
    await store.close()


async def test_a_lease_frees_a_slot_whose_router_died(make_store):
    clock = Clock()
    store = make_store(clock, lease=30)
    who = tenant(concurrent=1)
    await store.reserve(who, 1)  # never settled
    with pytest.raises(MeshError):
        await store.reserve(who, 1)
    clock.now += 31
    await store.reserve(who, 1)
    await store.close()


def _dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}"


async def test_fail_closed_refuses_at_once(caplog):
    failures = []
    store = RedisQuotaStore(
        _dead_url(), policy=FailurePolicy.CLOSED, timeout=0.2, retry_interval=5,
        on_unreachable=lambda: failures.append(1),
    )
    who = tenant(tokens_per_minute=1000)
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="llmmesh.tenancy"):
        for _ in range(3):
            with pytest.raises(MeshError) as caught:
                await store.reserve(who, 10)
    assert time.monotonic() - began < 2.0
    error = caught.value
    assert error.reason is Reason.QUOTA_STORE_UNAVAILABLE
    assert error.code == "UNAVAILABLE" and error.retry_after == 5
    # One attempt, one log line: later requests do not wait on Redis again.
    assert failures == [1]
    assert sum("quota store unreachable" in r.getMessage() for r in caplog.records) == 1
    # A tenant without limits is still served.
    await store.reserve(tenant("free"), 10)
    await store.close()


async def test_fail_open_serves_a_share_of_the_limit():
    store = RedisQuotaStore(
        _dead_url(), policy=FailurePolicy.OPEN, share=0.25, timeout=0.2, clock=Clock(),
    )
    who = tenant(tokens_per_minute=1000)
    await store.reserve(who, 250)
    with pytest.raises(MeshError) as caught:
        await store.reserve(who, 1)
    assert caught.value.reason is Reason.QUOTA_EXCEEDED
    assert caught.value.metadata["limit"] == "250"
    assert not store.reachable
    await store.close()


async def test_redis_going_away_and_coming_back(caplog):
    port = free_port()
    proc = _redis_server(port)
    failures = []
    store = RedisQuotaStore(
        f"redis://127.0.0.1:{port}", policy=FailurePolicy.OPEN, share=0.5, timeout=0.2,
        retry_interval=0.1, on_unreachable=lambda: failures.append(1),
        prefix=f"comeback:{time.monotonic_ns()}:",
    )
    who = tenant(tokens_per_minute=100)
    try:
        shared = await store.reserve(who, 80)
        assert shared.store is store
        stop(proc)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="llmmesh.tenancy"):
            local = await store.reserve(who, 50)  # half the limit, in this router
            assert local.store is not store
            assert time.monotonic() - began < 2.0
            await shared.settle(80)  # cannot reach Redis: logged, counted, no hang
            proc = _redis_server(port)
            await asyncio.sleep(0.15)
            back = await store.reserve(who, 20)
        assert back.store is store and store.reachable
        assert failures
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("quota store unreachable") == 1
        assert messages.count("quota store reachable again") == 1
    finally:
        await store.close()
        stop(proc)
