"""The gate (budget, queue, settle), per-tenant metrics, the usage report and
the error rows tenancy adds."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.errors import HTTP_STATUS, MeshError, Reason
from services.tenancy.admission import AdmissionQueue
from services.tenancy.gate import TenancyGate, model_capacity, resolve_priority
from services.tenancy.metrics import QueueCollector, TenancyMetrics
from services.tenancy.priority import Priority
from services.tenancy.quota_memory import MemoryQuotaStore
from services.tenancy.tenants import Tenant, TenantLimits
from services.tenancy.usage import usage_report
from tests.unit.test_tenancy_quota import Clock

SEARCH = Tenant(
    "search", models=frozenset({"qwen2"}), priority=Priority.INTERACTIVE,
    max_priority=Priority.INTERACTIVE, limits=TenantLimits(tokens_per_minute=1000, concurrent=2),
)
NIGHTLY = Tenant("nightly", priority=Priority.BATCH, weight=3)


@pytest.fixture
def parts():
    registry = CollectorRegistry()
    metrics = TenancyMetrics(registry)
    store = MemoryQuotaStore(Clock())
    queues = {"qwen2": AdmissionQueue("qwen2", 1, timeout=0.05),
              "llama3": AdmissionQueue("llama3", 1)}
    return TenancyGate(store, queues, metrics), store, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"service": "router", **labels})
    return 0.0 if value is None else value


async def test_a_request_reserves_queues_and_settles(parts):
    gate, store, registry = parts
    async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=600) as admission:
        assert admission.waited == 0.0 and gate.queues["qwen2"].in_use == 1
        assert admission.headers()["x-ratelimit-remaining-tokens"] == "400"
        admission.record(50, 10)
        admission.record(50, 150)  # the last counts
    await gate.drain()
    assert gate.queues["qwen2"].in_use == 0
    usage = await store.usage(SEARCH)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 200
    assert usage.concurrent == 0
    labels = {"tenant": "search", "model": "qwen2"}
    assert sample(registry, "llmmesh_tenant_input_tokens_total", **labels) == 50
    assert sample(registry, "llmmesh_tenant_output_tokens_total", **labels) == 150
    assert sample(registry, "llmmesh_tenant_requests_total", priority="interactive",
                  **labels) == 1
    assert sample(registry, "llmmesh_tenant_queue_seconds_count", priority="interactive",
                  **labels) == 1


async def test_over_budget_is_refused_before_the_queue(parts):
    gate, _, registry = parts
    with pytest.raises(MeshError) as caught:
        async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=1001):
            pass
    assert caught.value.reason is Reason.QUOTA_NEVER_FITS
    assert gate.queues["qwen2"].in_use == 0
    assert sample(registry, "llmmesh_tenant_refused_total", tenant="search", model="qwen2",
                  reason="quota_never_fits") == 1


async def test_a_quota_refusal_carries_the_tenants_windows(parts):
    gate, _, _ = parts
    async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=700):
        pass
    await gate.drain()
    with pytest.raises(MeshError) as caught:
        async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=400):
            pass
    assert caught.value.reason is Reason.QUOTA_EXCEEDED
    headers = caught.value.headers
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "300"
    assert headers["x-ratelimit-reset-tokens"] == "1m1s"
    assert "x-ratelimit-limit-requests" not in headers  # SEARCH has no request limit


async def test_a_model_the_tenant_may_not_use(parts):
    gate, _, _ = parts
    with pytest.raises(MeshError) as caught:
        async with gate.admit(SEARCH, "llama3", Priority.INTERACTIVE, tokens=1):
            pass
    assert caught.value.reason is Reason.MODEL_NOT_ALLOWED


async def test_queue_timeout_gives_the_reservation_back(parts):
    gate, store, registry = parts
    queue = gate.queues["qwen2"]
    await queue.acquire("someone", Priority.INTERACTIVE)
    with pytest.raises(MeshError) as caught:
        async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=900):
            pass
    assert caught.value.reason is Reason.QUEUE_TIMEOUT
    # The refusal carries the tenant's windows as the reservation saw them.
    assert caught.value.headers["x-ratelimit-limit-tokens"] == "1000"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "100"
    await gate.drain()
    usage = await store.usage(SEARCH)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 0
    assert usage.concurrent == 0
    assert sample(registry, "llmmesh_tenant_refused_total", tenant="search", model="qwen2",
                  reason="queue_timeout") == 1


async def test_failure_settles_with_what_was_recorded(parts):
    gate, store, _ = parts
    with pytest.raises(MeshError):
        async with gate.admit(NIGHTLY, "llama3", Priority.BATCH, tokens=500) as admission:
            admission.record(100, 20)
            raise MeshError(Reason.INCOMPLETE_GENERATION, "broke off")
    with pytest.raises(MeshError):
        async with gate.admit(NIGHTLY, "llama3", Priority.BATCH, tokens=500):
            raise MeshError(Reason.BACKEND_UNAVAILABLE, "down")
    async with gate.admit(NIGHTLY, "llama3", Priority.BATCH, tokens=500):
        pass  # succeeded, recorded nothing: the whole reservation counts
    await gate.drain()
    usage = await store.usage(NIGHTLY)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 620


async def test_a_cancelled_request_frees_its_slot_and_settles(parts):
    gate, store, _ = parts
    entered = asyncio.Event()

    async def request():
        async with gate.admit(NIGHTLY, "llama3", Priority.BATCH, tokens=300) as admission:
            admission.record(10, 5)
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(request())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.queues["llama3"].in_use == 0
    await gate.drain()
    usage = await store.usage(NIGHTLY)
    assert next(w for w in usage.windows if w.name == "tokens_per_minute").used == 15


def test_priority_of_a_tenant():
    assert resolve_priority(NIGHTLY) is Priority.BATCH
    assert resolve_priority(SEARCH, service_tier="flex") is Priority.BATCH
    with pytest.raises(MeshError):
        resolve_priority(NIGHTLY, header="standard")  # above its cap (batch)


def test_model_capacity():
    assert model_capacity(8, [(True, None, 0), (True, None, 0)]) == 16
    assert model_capacity(8, [(True, 5, 2), (False, None, 0)]) == 5  # 3 slots held by others
    assert model_capacity(8, [(True, 30, 0)]) == 1  # never stalled
    assert model_capacity(8, []) == 0


async def test_usage_report_lists_every_tenant(parts):
    gate, store, _ = parts
    async with gate.admit(SEARCH, "qwen2", Priority.INTERACTIVE, tokens=100):
        report = await usage_report(store, [SEARCH, NIGHTLY])
    body = json.loads(json.dumps(report))
    assert [t["tenant"] for t in body["tenants"]] == ["search", "nightly"]
    assert body["tenants"][0]["windows"]["tokens_per_minute"]["used"] == 100
    assert body["tenants"][0]["concurrent"] == {"limit": 2, "in_flight": 1}
    assert body["tenants"][1]["windows"]["tokens_per_minute"]["limit"] is None


def test_metrics_hold_tenant_names_never_keys():
    registry = CollectorRegistry()
    metrics = TenancyMetrics(registry)
    metrics.declare("search", ["qwen2"])
    metrics.store_failed()
    text = generate_latest(registry).decode()
    assert 'tenant="search"' in text and "llmmesh_quota_store_errors_total" in text
    assert sample(registry, "llmmesh_tenant_requests_total", tenant="search", model="qwen2",
                  priority="batch") == 0
    for reason in ("quota_exceeded", "quota_never_fits", "queue_timeout", "overloaded"):
        assert registry.get_sample_value("llmmesh_tenant_refused_total", {
            "service": "router", "tenant": "search", "model": "qwen2", "reason": reason}) == 0
    assert "sk-" not in text


@pytest.mark.parametrize(("reason", "code", "status", "retryable"), [
    (Reason.QUOTA_EXCEEDED, "RESOURCE_EXHAUSTED", 429, True),
    (Reason.QUOTA_NEVER_FITS, "RESOURCE_EXHAUSTED", 429, False),
    (Reason.QUEUE_TIMEOUT, "RESOURCE_EXHAUSTED", 429, True),
    (Reason.MODEL_NOT_ALLOWED, "PERMISSION_DENIED", 403, False),
    (Reason.QUOTA_STORE_UNAVAILABLE, "UNAVAILABLE", 503, True),
    (Reason.ADMIN_ONLY, "PERMISSION_DENIED", 403, False),
])
def test_error_rows(reason, code, status, retryable):
    error = MeshError(reason, "x", retry_after=1.0)
    assert (error.code, error.http_status, error.retryable) == (code, status, retryable)
    assert grpc.StatusCode[code] and HTTP_STATUS[code] == status
    assert reason.label == reason.value.lower()


async def test_queue_gauges_are_read_at_scrape_time():
    registry = CollectorRegistry()
    queue = AdmissionQueue("qwen2", 2)
    registry.register(QueueCollector({"qwen2": queue}))
    for _ in range(2):
        await queue.acquire("a", Priority.BATCH)
    waiter = asyncio.create_task(queue.acquire("b", Priority.INTERACTIVE))
    await asyncio.sleep(0)
    assert sample(registry, "llmmesh_queue_slots", model="qwen2", state="capacity") == 2
    assert sample(registry, "llmmesh_queue_slots", model="qwen2", state="in_use") == 2
    assert sample(registry, "llmmesh_queue_waiting", model="qwen2", priority="interactive") == 1
    assert sample(registry, "llmmesh_queue_waiting", model="qwen2", priority="batch") == 0
    queue.release(Priority.BATCH)
    await waiter
    assert sample(registry, "llmmesh_queue_waiting", model="qwen2", priority="interactive") == 0


def test_token_upper_bound_never_counts_too_few():
    from services.tenancy.tokens import reservation, upper_bound

    assert upper_bound("") == 2
    assert upper_bound("héllo") == 6 + 2  # bytes, not characters
    assert reservation(120, 256) == 376 and reservation(-1, 10) == 10


def test_callers_resolve_tenant_and_band():
    from services.tenancy.caller import Callers
    from services.tenancy.tenants import parse_tenants

    tenants = parse_tenants(
        "tenants:\n  - name: ops\n    keys: [sk-ops]\n    admin: true\n"
        "    max_priority: interactive\n"
        "  - name: batchy\n    keys: [sk-b]\n    priority: batch\n"
    )
    callers = Callers(lambda: tenants)
    ops = callers.resolve([("authorization", "Bearer sk-ops"), ("x-llmmesh-priority", "batch")])
    assert (ops.tenant.name, ops.priority) == ("ops", Priority.BATCH)
    ops.require_admin()
    batchy = callers.resolve([("authorization", "Bearer sk-b")], service_tier="default")
    assert (batchy.tenant.name, batchy.priority) == ("batchy", Priority.BATCH)
    with pytest.raises(MeshError) as caught:
        batchy.require_admin()
    assert caught.value.reason is Reason.ADMIN_ONLY and caught.value.http_status == 403
    with pytest.raises(MeshError) as bad:
        callers.resolve([("authorization", "Bearer sk-b"), ("X-LLMMESH-PRIORITY", "standard")])
    assert bad.value.violations[0].field == "x-llmmesh-priority"
    with pytest.raises(MeshError) as unknown:
        callers.resolve([("authorization", "Bearer sk-none")])
    assert unknown.value.reason is Reason.UNAUTHENTICATED
    open_mesh = Callers(lambda: None).resolve([], service_tier="flex")
    assert (open_mesh.tenant.name, open_mesh.priority) == ("anonymous", Priority.BATCH)
