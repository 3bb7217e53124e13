"""Run the router: `python -m services.router [--registry models/registry.yaml]`.

Every flag can also come from the environment (LLMMESH_PORT, ...), as shown below.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvloop

from services.common import envflags, logs, tracing
from services.common.auth import ApiKeys
from services.common.grpc_server import (
    RunningServer,
    ServerSettings,
    add_server_arguments,
    server_settings,
    start_server,
)
from services.common.health import HealthBoard
from services.common.metrics import Metrics
from services.common.registry import Registry, load_registry
from services.common.servicer import SERVICE_NAME
from services.common.signals import serve_until_signalled
from services.openai.app import OpenAIFace, OpenAISettings
from services.openai.server import OpenAIListener, start_listener
from services.router import prefix_metrics
from services.router.choice import CACHE_AWARE, POLICIES, policy_name
from services.router.core import DEFAULT_MAX_TOTAL_IN_FLIGHT, RouterCore
from services.router.pool import ReplicaPool
from services.router.resume import DEFAULT_MAX_RESUMES
from services.router.scenarios import DEFAULT_FILE, Scenarios, load_scenarios
from services.tenancy.book import TenantBook
from services.tenancy.caller import Callers
from services.tenancy.metrics import QueueCollector, TenancyMetrics
from services.tenancy.settings import (
    TenancySettings,
    add_tenancy_arguments,
    make_gate,
    tenancy_settings,
)
from services.tenancy.tenants import Tenants, TenantsFileError, tenants_from_key_file

log = logging.getLogger("llmmesh.router")


@dataclass(frozen=True)
class RouterSettings:
    api_keys: ApiKeys | None
    registry: Registry
    scenarios: Scenarios
    server: ServerSettings
    default_timeout: float
    max_in_flight: int
    health_interval: float
    max_resumes: int = DEFAULT_MAX_RESUMES
    max_total_in_flight: int = DEFAULT_MAX_TOTAL_IN_FLIGHT
    replica_choice: str = CACHE_AWARE
    openai: OpenAISettings | None = None
    tenancy: TenancySettings = field(default_factory=TenancySettings)
    # The tenants file, read at start (None: no tenants file).
    book: TenantBook | None = None
    # API keys as tenants without limits (when there is no tenants file).
    key_tenants: Tenants | None = None


def parse_args(argv: list[str] | None = None) -> RouterSettings:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    add_server_arguments(p, default_port=50051)
    p.add_argument("--scenarios", default=str(DEFAULT_FILE), help="scenario templates (YAML)")
    p.add_argument(
        "--api-keys-file", default=None,
        help="require one of these keys (one per line) on every GenerateService call; "
             "LLMMESH_API_KEYS may also hold comma-separated keys",
    )
    p.add_argument(
        "--max-in-flight", type=int, default=512,
        help="requests per model the router holds at once; beyond, RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-in-flight-total", type=int, default=DEFAULT_MAX_TOTAL_IN_FLIGHT,
        help="requests the router holds at once over all models (what one process relays "
             "at its pace); beyond, RESOURCE_EXHAUSTED (HTTP 429) with a retry hint",
    )
    p.add_argument(
        "--max-resumes", type=int, default=DEFAULT_MAX_RESUMES,
        help="times a stream broken after its first text may continue on another "
             "replica (0: never)",
    )
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between health checks of each adapter replica")
    p.add_argument(
        "--replica-choice", type=_policy, default=CACHE_AWARE, metavar="|".join(POLICIES),
        help="cache-aware: the replica whose engine probably holds the request's prefix, "
             "unless much busier than the others, else by load; load: rank replicas by their "
             "engines' reported load and the router's own requests; in-flight: by the "
             "router's own requests alone; round-robin: in turn. A model's `replica_choice` "
             "in the registry overrides it",
    )
    p.add_argument(
        "--openai-port", type=int, default=None,
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
             "/v1/models) on this port of --host; off when unset",
    )
    add_tenancy_arguments(p)
    envflags.apply(p, env)
    args = p.parse_args(argv)
    logs.setup("router", args.log_level)
    registry = load_registry(args.registry)
    for spec in registry.models:
        if not spec.adapters:
            p.error(f"model {spec.id} has no adapters in {args.registry}")
        if spec.replica_choice:
            try:
                policy_name(spec.replica_choice)
            except ValueError as exc:
                p.error(f"model {spec.id} in {args.registry}: {exc}")
    tenancy = tenancy_settings(p, args)
    book: TenantBook | None = None
    key_tenants: Tenants | None = None
    try:
        if tenancy.tenants_file is not None:
            book = TenantBook(tenancy.tenants_file, _canonical(registry))
        else:
            key_tenants = tenants_from_key_file(
                args.api_keys_file, env.get("LLMMESH_API_KEYS"))
    except TenantsFileError as exc:
        raise SystemExit(f"cannot use the tenants: {exc}") from exc
    return RouterSettings(
        api_keys=None,
        tenancy=tenancy,
        book=book,
        key_tenants=key_tenants,
        registry=registry,
        scenarios=load_scenarios(args.scenarios),
        server=server_settings(args),
        default_timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        health_interval=args.health_interval,
        max_resumes=max(args.max_resumes, 0),
        max_total_in_flight=args.max_in_flight_total,
        replica_choice=args.replica_choice,
        openai=OpenAISettings(
            host=args.host, port=args.openai_port, request_timeout=args.timeout,
            grace_seconds=args.grace, tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_ca=args.tls_ca,
        ) if args.openai_port is not None else None,
    )


def _canonical(registry: Registry) -> Callable[[str], str | None]:
    def canonical(name: str) -> str | None:
        spec = registry.find(name)
        return spec.id if spec is not None else None

    return canonical


async def run(settings: RouterSettings) -> None:
    metrics = Metrics("router")
    server_tls = settings.server.tls
    # With TLS the router calls its adapters with the same identity it serves with.
    credentials = server_tls.channel_credentials() if server_tls is not None else None
    pools = {
        spec.id: ReplicaPool(
            spec.id, spec.adapters, spec.limits, credentials,
            policy=policy_name(spec.replica_choice or settings.replica_choice),
        )
        for spec in settings.registry.models
    }
    book = settings.book
    gate = None
    if book is not None:
        # Tenants on: budgets, and a queue per model in front of its replicas.
        tenancy_metrics = TenancyMetrics(metrics.registry)
        slots = {
            spec.id: (spec.slots or settings.tenancy.slots_per_replica) * len(spec.adapters)
            for spec in settings.registry.models
        }
        gate = make_gate(settings.tenancy, slots, tenancy_metrics)
        metrics.registry.register(QueueCollector(gate.queues))
        for tenant in book.current.tenants:
            tenancy_metrics.declare(tenant.name, [s.id for s in settings.registry.models])
    tenants: Callable[[], Tenants | None] = (
        (lambda: book.current) if book is not None else (lambda: settings.key_tenants)
    )
    prefix_metrics.register(metrics.registry, pools, metrics.service)
    core = RouterCore(
        settings.registry, settings.scenarios, pools, metrics,
        default_timeout=settings.default_timeout, max_in_flight=settings.max_in_flight,
        max_resumes=settings.max_resumes,
        max_total_in_flight=settings.max_total_in_flight,
        gate=gate, slots_per_replica=settings.tenancy.slots_per_replica, tenants=tenants,
    )
    callers = Callers(tenants) if book is not None or settings.key_tenants is not None else None
    health = HealthBoard()

    async def on_change(servable: dict[str, bool]) -> None:
        anything = any(servable.values())
        await health.set("", anything)
        await health.set(SERVICE_NAME, anything)
        for model_id, ok in servable.items():
            await health.set(model_id, ok)
        log.info("models servable", extra={"servable": servable})

    await on_change({spec.id: False for spec in settings.registry.models})
    running = await start_server(core, metrics, health, settings.server, callers=callers)
    if settings.openai is not None:
        face = OpenAIFace(core, metrics, settings.openai, callers=callers)
        listener = await start_listener(face, settings.openai)
        running = _WithOpenAI(**vars(running), openai=listener)
        log.info("serving the OpenAI-compatible API", extra={"openai_port": listener.port})
    if settings.key_tenants is not None:
        log.info("API keys required", extra={"keys": len(settings.key_tenants)})
    watches = [core.watch(settings.health_interval, on_change)]
    if book is not None:
        log.info("tenants in force", extra={
            "file": str(book.path), "tenants": len(book.current),
            "quota_store": "memory" if settings.tenancy.quota_store == "memory" else "redis"})
        book.reload_on_sighup()
        watches.append(book.watch(settings.tenancy.reload_interval))

    async def stop() -> None:
        await core.close()
        if gate is not None:
            await gate.close()

    await serve_until_signalled(
        running, settings.server.grace_seconds, watch=_together(*watches), on_stop=stop,
    )


async def _together(*loops: Coroutine[Any, Any, None]) -> None:
    await asyncio.gather(*loops)


def _policy(value: str) -> str:
    try:
        return policy_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class _WithOpenAI(RunningServer):
    """The gRPC server and the OpenAI listener, stopped together."""

    openai: OpenAIListener | None = None

    async def stop(self, grace: float) -> None:
        assert self.openai is not None
        await asyncio.gather(super().stop(grace), self.openai.stop())


def main() -> None:
    settings = parse_args()
    tracing.setup("router")
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
