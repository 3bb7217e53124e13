"""Quotas counted in this process: the store of a mesh with one router.

Every method runs to completion without awaiting, so on one event loop a
reservation is atomic: two requests can never both take the last room.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.tenancy.quota import (
    CONCURRENT,
    WINDOWS,
    Reservation,
    TenantUsage,
    assess,
    demand,
    first_refusal,
    limit_of,
    new_id,
    refusal,
    state_of,
)
from services.tenancy.tenants import Tenant, TenantLimits


@dataclass
class _Ledger:
    """One tenant's windows (window name -> bucket -> amount) and open reservations."""

    buckets: dict[str, dict[int, int]] = field(
        default_factory=lambda: {w.name: {} for w in WINDOWS}
    )
    open: set[str] = field(default_factory=set)


class MemoryQuotaStore:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        limits: Callable[[Tenant], TenantLimits] | None = None,
    ) -> None:
        """`limits` may replace a tenant's limits (a fail-open share of them)."""
        self._clock = clock
        self._limits = limits
        self._ledgers: dict[str, _Ledger] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _ledger(self, tenant: str, now_ms: int) -> _Ledger:
        ledger = self._ledgers.setdefault(tenant, _Ledger())
        for window in WINDOWS:
            buckets = ledger.buckets[window.name]
            oldest_kept = window.index(now_ms) - window.buckets
            for bucket in [b for b in buckets if b <= oldest_kept]:
                del buckets[bucket]
        return ledger

    def _effective(self, tenant: Tenant) -> Tenant:
        if self._limits is None:
            return tenant
        return Tenant(tenant.name, limits=self._limits(tenant))

    async def reserve(self, tenant: Tenant, tokens: int, requests: int = 1) -> Reservation:
        now = self._now_ms()
        bound = self._effective(tenant)
        ledger = self._ledger(tenant.name, now)
        checks = [
            (w, demand(w, requests, tokens),
             assess(w, ledger.buckets[w.name], limit_of(bound.limits, w.name),
                    demand(w, requests, tokens), now))
            for w in WINDOWS
        ]
        error = first_refusal(bound, checks)
        if error is not None:
            raise error
        concurrent = bound.limits.concurrent
        if concurrent is not None and len(ledger.open) + 1 > concurrent:
            raise refusal(bound, CONCURRENT, concurrent, 1, None, False)
        charged: dict[str, int] = {}
        states = []
        for window, amount, verdict in checks:
            bucket = window.index(now)
            if amount:
                slots = ledger.buckets[window.name]
                slots[bucket] = slots.get(bucket, 0) + amount
            charged[window.name] = bucket
            oldest = bucket if verdict.oldest is None else verdict.oldest
            states.append(state_of(
                window, limit_of(bound.limits, window.name), verdict.used + amount, oldest,
                bucket, now,
            ))
        reservation = Reservation(
            new_id(), tenant, requests, tokens, charged, tuple(states), self,
            concurrent=len(ledger.open) + 1,
        )
        ledger.open.add(reservation.id)
        return reservation

    async def settle(self, reservation: Reservation, actual_tokens: int) -> int:
        ledger = self._ledger(reservation.tenant.name, self._now_ms())
        ledger.open.discard(reservation.id)
        refund = reservation.tokens - actual_tokens
        for window in WINDOWS:
            if not window.tokens:
                continue
            slots = ledger.buckets[window.name]
            bucket = reservation.buckets[window.name]
            if bucket in slots:  # else it has left the window: nothing to give back
                slots[bucket] = max(0, slots[bucket] - refund)
        return max(0, -refund)

    async def usage(self, tenant: Tenant) -> TenantUsage:
        now = self._now_ms()
        bound = self._effective(tenant)
        ledger = self._ledger(tenant.name, now)
        states = []
        for window in WINDOWS:
            verdict = assess(window, ledger.buckets[window.name], None, 0, now)
            states.append(state_of(
                window, limit_of(bound.limits, window.name), verdict.used, verdict.oldest,
                verdict.newest, now,
            ))
        return TenantUsage(tenant.name, tuple(states), len(ledger.open), bound.limits.concurrent)

    async def close(self) -> None:
        self._ledgers.clear()
