"""What a tenant has used: the admin's usage report and OpenAI's rate-limit headers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from services.tenancy.quota import QuotaStore, Reservation, TenantUsage, WindowState
from services.tenancy.tenants import Tenant


async def usage_report(store: QuotaStore, tenants: Iterable[Tenant]) -> dict[str, Any]:
    """The body of GET /v1/mesh/usage: every tenant's current windows."""
    report: list[TenantUsage] = [await store.usage(t) for t in tenants]
    return {"tenants": [u.as_dict() for u in report]}


def duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(reservation: Reservation) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for requests and tokens per minute, as the
    reservation left them; only for limits the tenant has."""
    return headers_of(reservation.states)


def headers_of(states: Iterable[WindowState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers of a tenant's windows (a reservation's, or
    the store's read of them when a request was refused)."""
    by_name = {s.name: s for s in states}
    headers: dict[str, str] = {}
    for name, kind in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens")):
        state = by_name.get(name)
        if state is None or state.limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = duration(state.resets_in)
    return headers
