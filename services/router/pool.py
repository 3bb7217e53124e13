"""Adapter replicas of one model: channels, health, and the choice of replica.

Each replica keeps one long-lived gRPC channel. A background loop checks
every replica's grpc.health.v1 status, resolves `dns:///` entries again (so
scaling a Deployment behind a headless Service adds replicas without a config
change), and asks every serving replica for the model's details, which carry
its engine's load. Requests go to the serving replica the pool's policy
chooses: services.router.choice ranks replicas by load (or in turn), and the
`cache-aware` policy (services.router.prefix_choice) first looks for the
replica whose engine probably holds the request's prefix.

A replica that leaves, or stops serving, loses its prefix index: when it
comes back its engine's cache is likely empty.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time

import grpc

from services.common.errors import MeshError
from services.common.types import EngineLoad, GenerationRequest, Limits, ModelInfo
from services.router.choice import CACHE_AWARE, choose
from services.router.prefix_choice import PrefixRouter, PrefixSettings
from services.router.replica import Replica

log = logging.getLogger("llmmesh.router")


class ReplicaPool:
    def __init__(
        self,
        model_id: str,
        targets: tuple[str, ...],
        limits: Limits,
        credentials: grpc.ChannelCredentials | None = None,
        policy: str = CACHE_AWARE,
        prefix: PrefixSettings | None = None,
    ) -> None:
        self._credentials = credentials
        self.policy = policy
        # The per-replica prefix indexes (cache-aware choice only).
        self.prefix = PrefixRouter(prefix) if policy == CACHE_AWARE else None
        self.model_id = model_id
        self.targets = targets
        self.replicas: dict[str, Replica] = {}
        self.details: ModelInfo | None = None  # as the adapters report it
        self._static_limits = limits
        self._turn = itertools.count()
        # Set after the first health round: before it, "no serving replica"
        # only means that none has been checked yet.
        self.checked = asyncio.Event()
        # Since when (a wall-clock time) no replica has served, as the health
        # rounds saw it; None while one serves.
        self.down_since: float | None = None

    @property
    def ready_count(self) -> int:
        return sum(r.serving for r in self.replicas.values())

    @property
    def limits(self) -> Limits:
        """The adapters' limits once known (they include the engine's)."""
        return self.details.limits if self.details is not None else self._static_limits

    @property
    def load(self) -> EngineLoad | None:
        """The engine load summed over serving replicas that report one."""
        loads = [r.load for r in self.replicas.values() if r.serving and r.load is not None]
        if not loads:
            return None
        kv = [x.kv_cache_usage for x in loads if x.kv_cache_usage is not None]
        return EngineLoad(
            waiting=sum(x.waiting for x in loads),
            running=sum(x.running for x in loads),
            kv_cache_usage=max(kv) if kv else None,
        )

    def pick(
        self, exclude: set[Replica], request: GenerationRequest | None = None
    ) -> Replica | None:
        """The serving replica the pool's policy chooses for `request`; ties take turns."""
        candidates = [r for r in self.replicas.values() if r.serving and r not in exclude]
        turn = next(self._turn)
        if self.prefix is None or request is None:
            return choose(candidates, "load" if self.prefix else self.policy, turn)
        choice = self.prefix.route(candidates, request, turn)
        return None if choice is None else choice.replica

    def mark_down(self, replica: Replica) -> None:
        if replica.serving:
            log.warning(
                "replica marked down", extra={"model": self.model_id, "replica": replica.address}
            )
            self._forget(replica.address)
        replica.serving = False

    def _forget(self, address: str) -> None:
        if self.prefix is not None:
            self.prefix.forget(address)

    async def refresh(self, timeout: float) -> None:
        """Resolve targets, check every replica, and fetch details when serving."""
        addresses = await _resolve(self.targets)
        for address in set(self.replicas) - addresses:
            replica = self.replicas.pop(address)
            self._forget(address)
            await replica.close(grace=30)
        for address in addresses - set(self.replicas):
            self.replicas[address] = Replica.connect(address, self._credentials)
        replicas = list(self.replicas.values())
        results = await asyncio.gather(*(r.check(timeout) for r in replicas))
        for replica, serving in zip(replicas, results, strict=True):
            if serving != replica.serving:
                log.info(
                    "replica health changed",
                    extra={"model": self.model_id, "replica": replica.address, "serving": serving},
                )
                if not serving:
                    self._forget(replica.address)
            replica.serving = serving
        if self.ready_count:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.time()
        self.checked.set()
        up = [r for r in replicas if r.serving]
        infos = await asyncio.gather(
            *(r.model_info(self.model_id, self._static_limits, timeout) for r in up),
            return_exceptions=True,
        )
        for replica, info in zip(up, infos, strict=True):
            if isinstance(info, MeshError):
                replica.report(None)
            elif isinstance(info, BaseException):
                raise info
            else:
                replica.report(info.load)
                if self.details is None or replica is up[0]:
                    self.details = info

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.close()


async def _resolve(targets: tuple[str, ...]) -> set[str]:
    out: set[str] = set()
    loop = asyncio.get_running_loop()
    for target in targets:
        if not target.startswith("dns:///"):
            out.add(target)
            continue
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.warning("cannot resolve adapters", extra={"target": target, "error": str(exc)})
            continue
        for family, *_rest, sockaddr in infos:
            ip, port_number = str(sockaddr[0]), int(sockaddr[1])
            out.add(f"[{ip}]:{port_number}" if family == socket.AF_INET6 else f"{ip}:{port_number}")
    return out
