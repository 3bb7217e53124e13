"""The router's core: find the model, validate, apply the scenario, forward.

An invalid request never reaches an adapter. A request goes to one serving
replica of its model; when that replica answers UNAVAILABLE before any text
reached the client, the request is tried once on each other replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

from services.common.errors import FieldViolation, MeshError, Reason, clip, invalid
from services.common.metrics import UNKNOWN_MODEL, Metrics
from services.common.registry import ModelSpec, Registry
from services.common.request_context import UNKNOWN, RequestContext
from services.common.types import Chunk, Generation, GenerationRequest, ModelInfo
from services.common.validation import validate
from services.router.pool import ReplicaPool
from services.router.replica import Replica
from services.router.scenarios import DEFAULT_SCENARIO, Scenarios

log = logging.getLogger("llmmesh.router")

# Seconds a request may wait for a just-started router's first health round.
FIRST_CHECK_WAIT = 3.0


class RouterCore:
    def __init__(
        self,
        registry: Registry,
        scenarios: Scenarios,
        pools: Mapping[str, ReplicaPool],
        metrics: Metrics,
        *,
        default_timeout: float | None = 600.0,
        max_in_flight: int = 512,
    ) -> None:
        self._registry = registry
        self._scenarios = scenarios
        self._pools = pools
        self._metrics = metrics
        # The router's own bound per model, over all replicas: beyond it a
        # request is refused at once instead of queueing without limit.
        self._max_in_flight = max_in_flight
        self._in_flight = {spec.id: 0 for spec in registry.models}
        self._default_timeout = default_timeout
        for spec in registry.models:
            metrics.declare_model(spec.id)

    # -- the GenerationCore protocol -----------------------------------------------

    def resolve(self, model_id: str, scenario: str) -> RequestContext:
        spec = self._registry.find(model_id) if model_id else None
        scenario = scenario or DEFAULT_SCENARIO
        return RequestContext(
            model=spec,
            model_label=spec.id if spec else UNKNOWN_MODEL,
            scenario=scenario if scenario in self._scenarios else UNKNOWN,
        )

    async def list_models(self) -> list[ModelInfo]:
        return [self._info(spec) for spec in self._registry.models]

    async def get_model(self, model_id: str) -> ModelInfo:
        return self._info(self._spec(model_id))

    async def generate(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> Generation:
        spec, forward = self._prepare(request, context)
        tried: set[Replica] = set()
        last: MeshError | None = None
        with self._admit(spec):
            while True:
                replica = await self._pick(spec, tried, last, forward)
                try:
                    with replica.track():
                        result = await replica.generate(forward, self._deadline(timeout))
                except MeshError as exc:
                    last = exc
                    if not self._failover(spec, replica, last, tried):
                        raise
                    continue
                self._metrics.record_tokens(spec.id, result.input_tokens, result.tokens)
                return result

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None,
        context: RequestContext | None = None,
    ) -> AsyncIterator[Chunk | Generation]:
        spec, forward = self._prepare(request, context)
        with self._admit(spec):
            async for event in self._relay(spec, forward, timeout):
                yield event

    async def _relay(
        self, spec: ModelSpec, forward: GenerationRequest, timeout: float | None
    ) -> AsyncIterator[Chunk | Generation]:
        tried: set[Replica] = set()
        last: MeshError | None = None
        while True:
            replica = await self._pick(spec, tried, last, forward)
            events = replica.generate_stream(forward, self._deadline(timeout))
            sent = False
            try:
                with replica.track():
                    async for event in events:
                        if isinstance(event, Generation):
                            self._metrics.record_tokens(spec.id, event.input_tokens, event.tokens)
                        sent = True
                        yield event
                return
            except MeshError as exc:
                last = exc
                if sent or not self._failover(spec, replica, last, tried):
                    raise
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    # -- health -------------------------------------------------------------------

    async def refresh(self, timeout: float = 1.0) -> None:
        await asyncio.gather(*(pool.refresh(timeout) for pool in self._pools.values()))
        for spec in self._registry.models:
            for replica in self._pools[spec.id].replicas.values():
                self._metrics.engine_up.labels(
                    self._metrics.service, spec.id, replica.address
                ).set(int(replica.serving))

    def servable(self) -> dict[str, bool]:
        return {model_id: pool.ready_count > 0 for model_id, pool in self._pools.items()}

    async def watch(
        self, interval: float, on_change: Callable[[dict[str, bool]], Awaitable[None]]
    ) -> None:
        """Check the replicas forever; on_change(servable) whenever it changes."""
        last: dict[str, bool] | None = None
        while True:
            try:
                await self.refresh()
            except Exception:  # keep watching whatever one round did
                log.exception("health round failed")
            now = self.servable()
            if now != last:
                await on_change(now)
                last = now
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()

    # -- helpers ------------------------------------------------------------------

    def _spec(self, model_id: str, spec: ModelSpec | None = None) -> ModelSpec:
        """The model `model_id` names (`spec`, when already resolved)."""
        if spec is not None:
            return spec
        known = ", ".join(m.id for m in self._registry.models)
        if not model_id:
            raise invalid([FieldViolation("model_id", f"is required; known models: {known}")])
        spec = self._registry.find(model_id)
        if spec is None:
            raise MeshError(
                Reason.MODEL_NOT_FOUND,
                f"unknown model {clip(model_id)!r}; known models: {known}",
                metadata={"model_id": clip(model_id), "known_models": known},
            )
        return spec

    def _prepare(
        self, request: GenerationRequest, context: RequestContext | None
    ) -> tuple[ModelSpec, GenerationRequest]:
        spec = self._spec(request.model_id, context.model if context is not None else None)
        forward = self._scenarios.apply(request, model_id=spec.id)
        validate(request, self._pools[spec.id].limits)
        return spec, forward

    async def _pick(
        self, spec: ModelSpec, tried: set[Replica], last: MeshError | None,
        request: GenerationRequest,
    ) -> Replica:
        pool = self._pools[spec.id]
        if not pool.checked.is_set():
            # A router that has just started (behind Envoy, during a restart)
            # waits for its first health round instead of answering
            # MODEL_UNAVAILABLE to the requests that arrive before it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.checked.wait(), FIRST_CHECK_WAIT)
        replica = pool.pick(tried, request)
        if replica is not None:
            return replica
        if last is not None:
            raise last  # every replica tried: the last one's own error says most
        raise MeshError(
            Reason.MODEL_UNAVAILABLE,
            f"model {spec.id} has no serving replica right now",
            metadata={"model_id": spec.id},
            retry_after=2.0,
        )

    def _failover(
        self, spec: ModelSpec, replica: Replica, error: MeshError, tried: set[Replica]
    ) -> bool:
        """Whether to try another replica after `error` (UNAVAILABLE before any text).

        A replica that cannot be reached, or whose engine is down, is marked
        down until its health check says otherwise; one whose generation broke
        off stays in rotation.
        """
        if error.code != "UNAVAILABLE":
            return False
        if error.reason in (Reason.BACKEND_UNAVAILABLE, Reason.MODEL_UNAVAILABLE):
            self._pools[spec.id].mark_down(replica)
        tried.add(replica)
        log.warning(
            "replica unavailable, trying another",
            extra={"model": spec.id, "replica": replica.address, "error": error.message},
        )
        return True

    @contextlib.contextmanager
    def _admit(self, spec: ModelSpec) -> Iterator[None]:
        if self._in_flight[spec.id] >= self._max_in_flight:
            raise MeshError(
                Reason.OVERLOADED,
                f"model {spec.id} has {self._max_in_flight} requests in flight at the router, "
                "its limit; retry shortly",
                metadata={"model_id": spec.id, "limit": str(self._max_in_flight)},
                retry_after=1.0,
            )
        self._in_flight[spec.id] += 1
        try:
            yield
        finally:
            self._in_flight[spec.id] -= 1

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._default_timeout

    def _info(self, spec: ModelSpec) -> ModelInfo:
        pool = self._pools[spec.id]
        details = pool.details
        return ModelInfo(
            id=spec.id,
            name=spec.name,
            aliases=spec.aliases,
            engine_model=details.engine_model if details else "",
            limits=pool.limits,
            ready=pool.ready_count > 0,
            replicas=len(pool.replicas) or len(spec.adapters),
            ready_replicas=pool.ready_count,
            load=pool.load,
        )

