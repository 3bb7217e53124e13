"""One call the router's core makes per request: budget, then queue, then settle.

    async with gate.admit(tenant, model_id, priority, tokens=reserved) as admission:
        ... generate; admission.record(input_tokens, output_tokens) as counts arrive ...

In that order: the tenant may use the model (else PERMISSION_DENIED); its
budget has room for the reservation (else 429 at once: budgets are not a
queue); then a slot of the model's queue (waiting by priority and fair
share). The reservation is held while the request waits, so a tenant's
`concurrent` limit counts its waiting requests too. When the body ends the
slot is freed at once and the reservation settles with the tokens recorded
(all of them if the request succeeded without recording any; none if it
failed before any text). Settling runs as its own task, so it completes even
when the request's task is cancelled or its generator closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from services.common.errors import MeshError
from services.tenancy.admission import AdmissionQueue
from services.tenancy.metrics import TenancyMetrics
from services.tenancy.priority import Priority, resolve
from services.tenancy.quota import QuotaStore, Reservation
from services.tenancy.tenants import Tenant
from services.tenancy.usage import headers_of, ratelimit_headers

log = logging.getLogger("llmmesh.tenancy")


@dataclass
class Admission:
    """One admitted request: who, where, how urgent, what it holds."""

    tenant: Tenant
    model: str
    priority: Priority
    reservation: Reservation
    waited: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    _recorded: bool = field(default=False, repr=False)

    def record(self, input_tokens: int, output_tokens: int) -> None:
        """The request's tokens so far (the engine's counts); the last call counts."""
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self._recorded = True

    @property
    def used(self) -> int | None:
        if not self._recorded:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for this request's tenant."""
        return ratelimit_headers(self.reservation)


def resolve_priority(
    tenant: Tenant, header: str | None = None, service_tier: str | None = None
) -> Priority:
    """The band of a request of `tenant` (see services.tenancy.priority)."""
    return resolve(tenant.priority, tenant.cap, header, service_tier)


def model_capacity(
    slots_per_replica: int, replicas: Iterable[tuple[bool, int | None, int]]
) -> int:
    """A model's slots at this router. Each replica is (serving, the requests its
    engine reported running or waiting (None: no report), this router's requests
    there when it reported). Requests of other routers or callers take slots; a
    serving replica keeps at least one, so stale or foreign load never stalls
    a model."""
    total = 0
    for serving, reported, own_at_report in replicas:
        if not serving:
            continue
        foreign = max(0, reported - own_at_report) if reported is not None else 0
        total += max(1, slots_per_replica - foreign)
    return total


class TenancyGate:
    def __init__(
        self,
        store: QuotaStore,
        queues: Mapping[str, AdmissionQueue],
        metrics: TenancyMetrics | None = None,
    ) -> None:
        self.store = store
        self.queues = queues
        self._metrics = metrics
        self._settling: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def admit(
        self, tenant: Tenant, model: str, priority: Priority, *, tokens: int,
        queue_timeout: float | None = None,
    ) -> AsyncIterator[Admission]:
        try:
            tenant.check_model(model)
            reservation = await self.store.reserve(tenant, tokens)
        except MeshError as exc:
            self._refused(tenant, model, exc)
            if exc.http_status == 429:
                exc.headers.update(await self._windows(tenant))
            raise
        queue = self.queues[model]
        try:
            waited = await queue.acquire(
                tenant.name, priority, weight=tenant.weight, cost=max(1, tokens),
                timeout=queue_timeout,
            )
        except BaseException as exc:
            if isinstance(exc, MeshError):
                self._refused(tenant, model, exc)
                exc.headers.update(ratelimit_headers(reservation))
            self._settle(reservation, 0)
            raise
        admission = Admission(tenant, model, priority, reservation, waited)
        if self._metrics is not None:
            self._metrics.record_admitted(tenant.name, model, priority, waited)
        ok = False
        try:
            yield admission
            ok = True
        finally:
            queue.release(priority)
            used = admission.used
            if used is None:
                used = reservation.tokens if ok else 0
            self._settle(reservation, used, admission)

    async def _windows(self, tenant: Tenant) -> dict[str, str]:
        """The rate-limit headers of a refused tenant's windows as the store has
        them now; none when the store cannot say (the refusal stands anyway)."""
        try:
            return headers_of((await self.store.usage(tenant)).windows)
        except Exception:
            log.warning("reading a refused tenant's windows failed", exc_info=True,
                        extra={"tenant": tenant.name})
            return {}

    def _refused(self, tenant: Tenant, model: str, error: MeshError) -> None:
        if self._metrics is not None and error.http_status == 429:
            self._metrics.record_refused(tenant.name, model, error.reason.label)

    def _settle(
        self, reservation: Reservation, used: int, admission: Admission | None = None
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._settle_now(reservation, used, admission)
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_now(
        self, reservation: Reservation, used: int, admission: Admission | None
    ) -> None:
        try:
            overshoot = await reservation.settle(used)
        except Exception:  # a store failure must not end anything else
            log.exception("settling a reservation failed", extra={
                "tenant": reservation.tenant.name})
            return
        if overshoot:
            log.warning("a request used more tokens than it reserved", extra={
                "tenant": reservation.tenant.name, "overshoot": overshoot})
        if self._metrics is not None and admission is not None:
            self._metrics.record_tokens(
                admission.tenant.name, admission.model, admission.input_tokens or 0,
                admission.output_tokens or 0, overshoot,
            )

    async def drain(self) -> None:
        """Wait for every settle under way (at shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self.store.close()
