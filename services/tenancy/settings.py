"""The router's tenancy flags, and the parts built from them.

Every flag also comes from the environment (services.common.envflags:
`--tenants-file` from LLMMESH_TENANTS_FILE, ...).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.tenancy.admission import AdmissionQueue
from services.tenancy.gate import TenancyGate
from services.tenancy.metrics import TenancyMetrics
from services.tenancy.quota import FailurePolicy, QuotaStore
from services.tenancy.quota_memory import MemoryQuotaStore

MEMORY = "memory"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class TenancySettings:
    tenants_file: Path | None = None
    # "memory" (this router alone) or a Redis URL (every router shares it).
    quota_store: str = MEMORY
    quota_failure: FailurePolicy = FailurePolicy.CLOSED
    # The part of each limit one router may use while Redis is away (policy open).
    quota_share: float = 1.0
    quota_timeout: float = 0.25
    # Requests a model's queue holds beyond its slots, and how long one waits.
    queue_size: int = 512
    queue_timeout: float = 30.0
    # Slots per replica for a model whose registry entry gives none.
    slots_per_replica: int = 8
    # The most slots of each model the batch band may not take: it is held
    # back only as many as the other bands used within headroom_memory seconds.
    headroom: int = 0
    headroom_memory: float = 3.0
    reload_interval: float = 2.0


def add_tenancy_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tenants, quotas and queuing")
    g.add_argument("--tenants-file", type=Path, default=None,
                   help="tenants (keys, models, limits, priority, weight) in YAML; reloaded "
                        "when it changes and on SIGHUP")
    g.add_argument("--quota-store", default=MEMORY,
                   help="where quota counters live: memory (one router) or "
                        "redis://HOST:PORT (shared by every router)")
    g.add_argument("--quota-failure", choices=[p.value for p in FailurePolicy],
                   default=FailurePolicy.CLOSED.value,
                   help="when Redis cannot be reached: closed refuses requests of tenants "
                        "with limits (503); open counts in this router against "
                        "--quota-share of each limit")
    g.add_argument("--quota-share", type=float, default=1.0,
                   help="the part of each limit this router may use alone while Redis is "
                        "away (1/N with N routers)")
    g.add_argument("--quota-timeout", type=float, default=0.25,
                   help="seconds a call to Redis may take before the failure policy applies")
    g.add_argument("--queue-size", type=int, default=512,
                   help="requests per model waiting for a slot; beyond, RESOURCE_EXHAUSTED")
    g.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for a slot; then RESOURCE_EXHAUSTED")
    g.add_argument("--slots-per-replica", type=int, default=8,
                   help="requests a replica's engine runs at once, for models whose "
                        "registry entry gives none")
    g.add_argument("--headroom", type=int, default=0,
                   help="the most slots of each model that batch requests may not take, so "
                        "interactive and standard ones start at once during a batch flood; "
                        "only as many are held as those bands used lately")
    g.add_argument("--headroom-memory", type=float, default=3.0,
                   help="seconds the held slots follow the most interactive and standard "
                        "requests in flight at once (none held after such a quiet spell)")


def tenancy_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> TenancySettings:
    """The settings of parsed flags; a bad value ends the program naming the flag."""
    store = args.quota_store
    if store != MEMORY and not store.startswith(_REDIS_SCHEMES):
        parser.error(f"--quota-store must be {MEMORY} or a redis:// URL, not {store!r}")
    if not 0 < args.quota_share <= 1:
        parser.error("--quota-share must be in (0, 1]")
    for flag in ("quota_timeout", "queue_timeout", "headroom_memory"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    for flag in ("queue_size", "slots_per_replica"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.headroom < 0:
        parser.error("--headroom must be >= 0")
    return TenancySettings(
        tenants_file=args.tenants_file,
        quota_store=store,
        quota_failure=FailurePolicy(args.quota_failure),
        quota_share=args.quota_share,
        quota_timeout=args.quota_timeout,
        queue_size=args.queue_size,
        queue_timeout=args.queue_timeout,
        slots_per_replica=args.slots_per_replica,
        headroom=args.headroom,
        headroom_memory=args.headroom_memory,
    )


def make_store(
    settings: TenancySettings,
    metrics: TenancyMetrics | None = None,
    clock: Callable[[], float] | None = None,
) -> QuotaStore:
    if settings.quota_store == MEMORY:
        return MemoryQuotaStore(clock or time.time)
    # Imported only when asked for: the Redis client loads OpenTelemetry.
    from services.tenancy.quota_redis import RedisQuotaStore

    return RedisQuotaStore(
        settings.quota_store,
        policy=settings.quota_failure,
        share=settings.quota_share,
        timeout=settings.quota_timeout,
        clock=clock,
        on_unreachable=metrics.store_failed if metrics is not None else None,
    )


def make_gate(
    settings: TenancySettings,
    slots: Mapping[str, int],
    metrics: TenancyMetrics | None = None,
) -> TenancyGate:
    """A gate with one queue per model; `slots` holds each model's starting
    capacity (update it with gate.queues[model].set_capacity)."""
    queues = {
        model: AdmissionQueue(
            model, capacity, max_waiting=settings.queue_size, timeout=settings.queue_timeout,
            headroom=settings.headroom, memory=settings.headroom_memory,
        )
        for model, capacity in slots.items()
    }
    return TenancyGate(make_store(settings, metrics), queues, metrics)
