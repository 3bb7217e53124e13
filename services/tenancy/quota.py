"""Quotas reserved before dispatch: the windows, the arithmetic, the store interface.

A request reserves, before it is sent to a model, one request and its tokens
(input + the most it may generate) against every limit of its tenant at
once; when it ends it settles with the tokens it really used and the unused
part goes back. A reservation that does not fit is refused at once with the
time at which it would fit (budgets are not a queue).

Windows are sliding and bucketed. A window of `span` seconds is kept in
buckets of `bucket` seconds; a charge goes to the bucket of the moment it is
made, and a reservation at bucket b counts buckets b-n+1 .. b, where
n = span/bucket + 1. Any `span` seconds lie inside n consecutive buckets,
so the tokens reserved in ANY span of that length never exceed the limit:
there is no doubled burst at a window edge as fixed windows allow; the price
is that a window looks back up to one bucket further than its span (61 s for
a minute, 24 h 5 min for a day). Tokens are charged when reserved, so tokens
served <= tokens reserved <= limit; only a request whose real use exceeds its
reservation (its input counted by an estimate) can overshoot, and settle()
reports by how much.

Concurrency counts reservations not yet settled; a shared store holds each
one under a lease, so a router that dies cannot hold a tenant's slots forever.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from services.common.errors import MeshError, Reason
from services.tenancy.tenants import Tenant, TenantLimits


@dataclass(frozen=True)
class Window:
    """One windowed budget of a tenant."""

    name: str  # the TenantLimits field that holds its limit
    span_ms: int
    bucket_ms: int
    tokens: bool  # charged in tokens (else in requests)

    @property
    def buckets(self) -> int:
        """How many buckets a reservation counts (n)."""
        return self.span_ms // self.bucket_ms + 1

    def index(self, now_ms: int) -> int:
        return now_ms // self.bucket_ms

    def leaves_at(self, bucket: int) -> int:
        """The time (ms) at which a bucket stops counting."""
        return (bucket + self.buckets) * self.bucket_ms


WINDOWS: tuple[Window, ...] = (
    Window("requests_per_minute", 60_000, 1_000, tokens=False),
    Window("tokens_per_minute", 60_000, 1_000, tokens=True),
    Window("tokens_per_day", 86_400_000, 300_000, tokens=True),
)
CONCURRENT = "concurrent"
# A refusal for concurrency cannot know when a request ends: retry after this.
CONCURRENCY_RETRY = 1.0


def limit_of(limits: TenantLimits, name: str) -> int | None:
    value: int | None = getattr(limits, name)
    return value


class FailurePolicy(StrEnum):
    """What a shared store does when it cannot be reached (see quota_redis)."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class WindowState:
    """A window as the last reservation (or a usage read) left it."""

    name: str
    limit: int | None
    used: int
    # Seconds until the oldest charge still counted leaves the window (0: none).
    frees_in: float
    # Seconds until every charge now counted has left it.
    resets_in: float

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


@dataclass(frozen=True)
class Assessment:
    """One window's verdict on a charge."""

    used: int  # charged in the window before this charge
    oldest: int | None  # the oldest bucket with a charge
    newest: int | None
    retry_ms: int | None  # None: fits (or never fits, see `never`)
    never: bool


def assess(
    window: Window, buckets: Mapping[int, int], limit: int | None, amount: int, now_ms: int
) -> Assessment:
    """Whether `amount` fits `limit` given the window's buckets at now_ms.

    Buckets older than the window are ignored (stores drop them). When it does
    not fit, retry_ms is when enough of the oldest charges will have left.
    """
    current = window.index(now_ms)
    live = sorted((b, v) for b, v in buckets.items() if b > current - window.buckets and v > 0)
    used = sum(v for _, v in live)
    oldest = live[0][0] if live else None
    newest = live[-1][0] if live else None
    if limit is None or used + amount <= limit:
        return Assessment(used, oldest, newest, None, False)
    if amount > limit:
        return Assessment(used, oldest, newest, None, True)
    excess, freed = used + amount - limit, 0
    for bucket, value in live:
        freed += value
        if freed >= excess:
            return Assessment(used, oldest, newest, window.leaves_at(bucket) - now_ms, False)
    raise AssertionError("a charge within the limit always fits an empty window")


def state_of(
    window: Window, limit: int | None, used: int, oldest: int | None, newest: int | None,
    now_ms: int,
) -> WindowState:
    frees = window.leaves_at(oldest) - now_ms if oldest is not None else 0
    resets = window.leaves_at(newest) - now_ms if newest is not None else 0
    return WindowState(window.name, limit, used, max(0, frees) / 1000, max(0, resets) / 1000)


def demand(window: Window, requests: int, tokens: int) -> int:
    return tokens if window.tokens else requests


def refusal(
    tenant: Tenant, window_name: str, limit: int, amount: int, retry_ms: int | None, never: bool
) -> MeshError:
    """The error for a reservation refused by one limit."""
    unit = "requests" if window_name in ("requests_per_minute", CONCURRENT) else "tokens"
    metadata = {
        "tenant": tenant.name, "limit_name": window_name, "limit": str(limit),
        "requested": str(amount),
    }
    if never:
        return MeshError(
            Reason.QUOTA_NEVER_FITS,
            f"this request needs {amount} {unit} but {window_name} is {limit}: it can never "
            "fit; ask for fewer tokens (max_tokens) or a shorter prompt",
            metadata=metadata,
        )
    retry = CONCURRENCY_RETRY if retry_ms is None else max(retry_ms, 1) / 1000
    metadata["retry_after_seconds"] = f"{retry:.3f}"
    what = (
        f"{limit} concurrent requests, all in use" if window_name == CONCURRENT
        else f"{window_name} is {limit} and has no room for {amount} more {unit}"
    )
    return MeshError(
        Reason.QUOTA_EXCEEDED,
        f"quota exceeded: {what}; retry in {math.ceil(retry)} s",
        metadata=metadata,
        retry_after=retry,
    )


_ids = itertools.count()
_PREFIX = os.urandom(4).hex()


def new_id() -> str:
    """A reservation id unique across routers (a random prefix per process)."""
    return f"{_PREFIX}-{next(_ids)}"


@dataclass(eq=False)
class Reservation:
    """What one request holds until it settles; it settles once, against the
    store and tenant it was made with, whatever happens to them since."""

    id: str
    tenant: Tenant
    requests: int
    tokens: int
    # Window name -> the bucket charged.
    buckets: dict[str, int]
    # The windows as this reservation left them (for rate-limit headers).
    states: tuple[WindowState, ...]
    store: QuotaStore
    concurrent: int = 0  # requests in flight, this one included
    settled: bool = field(default=False)

    async def settle(self, actual_tokens: int) -> int:
        """Give back what the request did not use; the tokens used beyond the
        reservation (overshoot), 0 when it stayed within."""
        if self.settled:
            return 0
        self.settled = True
        return await self.store.settle(self, max(0, actual_tokens))

    async def release(self) -> None:
        """The request failed before it was served: give back its tokens and
        its slot (the request itself still counts against requests_per_minute)."""
        await self.settle(0)

    def state(self, name: str) -> WindowState | None:
        return next((s for s in self.states if s.name == name), None)


class QuotaStore(Protocol):
    """Where reservations are counted: one router's memory, or a shared Redis."""

    async def reserve(self, tenant: Tenant, tokens: int, requests: int = 1) -> Reservation:
        """Reserve atomically against every limit, or raise MeshError
        (QUOTA_EXCEEDED with retry_after, QUOTA_NEVER_FITS, QUOTA_STORE_UNAVAILABLE)."""
        ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> int:
        """Called by Reservation.settle only."""
        ...

    async def usage(self, tenant: Tenant) -> TenantUsage:
        """The tenant's windows now."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's current windows (GET /v1/mesh/usage)."""

    tenant: str
    windows: tuple[WindowState, ...]
    concurrent: int
    concurrent_limit: int | None

    def as_dict(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "windows": {
                s.name: {
                    "limit": s.limit, "used": s.used, "remaining": s.remaining,
                    "frees_in_seconds": round(s.frees_in, 3),
                    "resets_in_seconds": round(s.resets_in, 3),
                }
                for s in self.windows
            },
            "concurrent": {"limit": self.concurrent_limit, "in_flight": self.concurrent},
        }


def first_refusal(
    tenant: Tenant,
    checks: Iterable[tuple[Window, int, Assessment]],
) -> MeshError | None:
    """The error for a set of window verdicts, or None when all fit: a limit the
    request can never fit wins; otherwise the latest retry time."""
    worst: tuple[Window, int, Assessment] | None = None
    for window, amount, verdict in checks:
        limit = limit_of(tenant.limits, window.name)
        if limit is None:
            continue
        if verdict.never:
            return refusal(tenant, window.name, limit, amount, None, True)
        if verdict.retry_ms is not None and (
            worst is None or verdict.retry_ms > (worst[2].retry_ms or 0)
        ):
            worst = (window, amount, verdict)
    if worst is None:
        return None
    window, amount, verdict = worst
    limit = limit_of(tenant.limits, window.name)
    assert limit is not None
    return refusal(tenant, window.name, limit, amount, verdict.retry_ms, False)
