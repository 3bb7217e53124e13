"""Per-tenant Prometheus metrics, all defined here.

Labels hold tenant names from the tenants file (bounded by it, never keys),
model ids from the registry, priority bands and reasons from
services.tenancy.errors (or the error table). Counters are registered on the
service's own registry, passed in; the queues' gauges are read at scrape
time (QueueCollector), so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.errors import Reason
from services.common.metrics import LATENCY_BUCKETS
from services.tenancy.admission import AdmissionQueue
from services.tenancy.priority import Priority

# Every reason tenancy refuses a request with 429 (its budget, then the queue).
REFUSALS: tuple[Reason, ...] = (
    Reason.QUOTA_EXCEEDED, Reason.QUOTA_NEVER_FITS, Reason.QUEUE_TIMEOUT, Reason.OVERLOADED,
)


class TenancyMetrics:
    def __init__(self, registry: CollectorRegistry, service: str = "router") -> None:
        self.service = service
        r = registry
        self.requests = Counter(
            "llmmesh_tenant_requests", "Requests admitted, by tenant, model and priority band.",
            ["service", "tenant", "model", "priority"], registry=r,
        )
        self.input_tokens = Counter(
            "llmmesh_tenant_input_tokens", "Prompt tokens served, by tenant.",
            ["service", "tenant", "model"], registry=r,
        )
        self.output_tokens = Counter(
            "llmmesh_tenant_output_tokens", "Tokens generated, by tenant.",
            ["service", "tenant", "model"], registry=r,
        )
        self.queue_time = Histogram(
            "llmmesh_tenant_queue_seconds", "Time a request waited in its model's queue.",
            ["service", "tenant", "model", "priority"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.refused = Counter(
            "llmmesh_tenant_refused", "Requests refused with 429, by reason.",
            ["service", "tenant", "model", "reason"], registry=r,
        )
        self.overshoot = Counter(
            "llmmesh_tenant_overshoot_tokens",
            "Tokens used beyond a request's reservation (its input was estimated).",
            ["service", "tenant"], registry=r,
        )
        self.store_errors = Counter(
            "llmmesh_quota_store_errors", "Calls to the shared quota store that failed.",
            ["service"], registry=r,
        )
        self.store_errors.labels(service)

    def declare(self, tenant: str, models: list[str]) -> None:
        """Create a tenant's series at zero (see Metrics.declare_model for why)."""
        for model in models:
            self.input_tokens.labels(self.service, tenant, model)
            self.output_tokens.labels(self.service, tenant, model)
            for p in Priority:
                self.requests.labels(self.service, tenant, model, p.label)
                self.queue_time.labels(self.service, tenant, model, p.label)
            for reason in REFUSALS:
                self.refused.labels(self.service, tenant, model, reason.label)
        self.overshoot.labels(self.service, tenant)

    def record_admitted(self, tenant: str, model: str, priority: Priority, waited: float) -> None:
        self.requests.labels(self.service, tenant, model, priority.label).inc()
        self.queue_time.labels(self.service, tenant, model, priority.label).observe(waited)

    def record_tokens(
        self, tenant: str, model: str, input_tokens: int, output_tokens: int, overshoot: int = 0
    ) -> None:
        self.input_tokens.labels(self.service, tenant, model).inc(input_tokens)
        self.output_tokens.labels(self.service, tenant, model).inc(output_tokens)
        if overshoot:
            self.overshoot.labels(self.service, tenant).inc(overshoot)

    def record_refused(self, tenant: str, model: str, reason: str) -> None:
        """`reason`: a reason's metric label (quota_exceeded, queue_timeout, overloaded)."""
        self.refused.labels(self.service, tenant, model, reason).inc()

    def store_failed(self) -> None:
        self.store_errors.labels(self.service).inc()


class QueueCollector(Collector):
    """The admission queues' state, read when Prometheus scrapes."""

    def __init__(self, queues: Mapping[str, AdmissionQueue], service: str = "router") -> None:
        self._queues = queues
        self._service = service

    def collect(self) -> Iterator[Metric]:
        slots = GaugeMetricFamily(
            "llmmesh_queue_slots", "A model's slots at the router: capacity and in use.",
            labels=["service", "model", "state"],
        )
        waiting = GaugeMetricFamily(
            "llmmesh_queue_waiting", "Requests waiting for a slot, by model and band.",
            labels=["service", "model", "priority"],
        )
        for model, queue in self._queues.items():
            stats = queue.stats()
            slots.add_metric([self._service, model, "capacity"], stats.capacity)
            slots.add_metric([self._service, model, "in_use"], stats.in_use)
            for band, count in stats.waiting.items():
                waiting.add_metric([self._service, model, band], count)
        yield slots
        yield waiting
