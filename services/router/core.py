"""The router's core: find the model, validate, apply the scenario, forward.

An invalid request never reaches an adapter. A request goes to one serving
replica of its model; when that replica answers UNAVAILABLE before any text
reached the client, the request is tried once on each other replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from services.common import tracing
from services.common.errors import FieldViolation, MeshError, Reason, clip, invalid
from services.common.metrics import UNKNOWN_MODEL, Metrics
from services.common.registry import ModelSpec, Registry
from services.common.request_context import UNKNOWN, RequestContext
from services.common.types import (
    Chunk,
    FinishReason,
    Generation,
    GenerationRequest,
    ModelInfo,
    ResumePolicy,
)
from services.common.validation import validate
from services.router import resume
from services.router.pool import ReplicaPool
from services.router.replica import Replica
from services.router.scenarios import DEFAULT_SCENARIO, Scenarios
from services.tenancy.gate import Admission, TenancyGate, model_capacity
from services.tenancy.quota import TenantUsage
from services.tenancy.tenants import ANONYMOUS, Tenant, Tenants
from services.tenancy.tokens import conversation_upper_bound, reservation, upper_bound

log = logging.getLogger("llmmesh.router")


# The key of `RouterCore._in_flight` that sums every model's (no model id is empty).
TOTAL = ""


class Counted:
    """Counts one under `key` and under TOTAL in `counts` while entered (a
    context manager without a generator: one is entered for every request)."""

    __slots__ = ("counts", "key")

    def __init__(self, counts: dict[str, int], key: str) -> None:
        self.counts = counts
        self.key = key

    def __enter__(self) -> None:
        self.counts[self.key] += 1
        self.counts[TOTAL] += 1

    def __exit__(self, *exc: object) -> None:
        self.counts[self.key] -= 1
        self.counts[TOTAL] -= 1


# Seconds a request may wait for a just-started router's first health round.
FIRST_CHECK_WAIT = 3.0
# Requests one router process holds at once, all models together.
DEFAULT_MAX_TOTAL_IN_FLIGHT = 256
# A stream is not resumed with less than this left before its deadline.
RESUME_MIN_SECONDS = 0.5


def model_down(model_id: str, since: float | None, now: float | None = None) -> MeshError:
    """MODEL_UNAVAILABLE for a model none of whose replicas serves, saying
    since when (`since`, a wall-clock time; None: not known yet)."""
    metadata = {"model_id": model_id}
    if since is None:
        return MeshError(
            Reason.MODEL_UNAVAILABLE, f"model {model_id} has no serving replica right now",
            metadata=metadata, retry_after=2.0,
        )
    now = time.time() if now is None else now
    at = datetime.fromtimestamp(since, UTC)
    metadata["down_since"] = at.isoformat(timespec="seconds").replace("+00:00", "Z")
    return MeshError(
        Reason.MODEL_UNAVAILABLE,
        f"model {model_id} has had no serving replica since {at:%H:%M:%S} UTC "
        f"({_ago(now - since)}); every request for it fails until one serves again",
        metadata=metadata, retry_after=2.0,
    )


def _ago(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"
# Seconds a replica may take to count a request's input tokens.
COUNT_TIMEOUT = 1.0


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
        max_resumes: int = resume.DEFAULT_MAX_RESUMES,
        max_total_in_flight: int = DEFAULT_MAX_TOTAL_IN_FLIGHT,
        gate: TenancyGate | None = None,
        slots_per_replica: int = 8,
        tenants: Callable[[], Tenants | None] | None = None,
    ) -> None:
        self._max_resumes = max_resumes
        # The router's own bound over every model: what one process relays.
        self._max_total = max_total_in_flight
        self._registry = registry
        self._scenarios = scenarios
        self._pools = pools
        self._metrics = metrics
        # The router's own bound per model, over all replicas: beyond it a
        # request is refused at once instead of queueing without limit.
        self._max_in_flight = max_in_flight
        self._in_flight = {spec.id: 0 for spec in registry.models}
        self._in_flight[TOTAL] = 0
        self._default_timeout = default_timeout
        # With tenants: budgets and the per-model queue (services.tenancy); its
        # queue bound takes the place of max_in_flight.
        self._gate = gate
        self._tenants = tenants
        self._slots = {spec.id: spec.slots or slots_per_replica for spec in registry.models}
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
        if self._gate is None:
            with self._admit(spec):
                return await self._generate(spec, forward, timeout)
        async with self._admission(spec, forward, context) as admission:
            result = await self._generate(spec, forward, timeout)
            admission.record(result.input_tokens, result.tokens)
            return result

    async def _generate(
        self, spec: ModelSpec, forward: GenerationRequest, timeout: float | None
    ) -> Generation:
        tried: set[Replica] = set()
        last: MeshError | None = None
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
        if self._gate is None:
            with self._admit(spec):
                async for event in self._relay(spec, forward, timeout):
                    yield event
            return
        async with self._admission(spec, forward, context) as admission:
            # What the request reserved for its input stands for it until the
            # engine's count arrives with the final event.
            reserved_input = admission.reservation.tokens - self._max_new_tokens(spec, forward)
            async for event in self._relay(spec, forward, timeout):
                if isinstance(event, Generation):
                    admission.record(event.input_tokens, event.tokens)
                else:
                    admission.record(reserved_input, event.tokens)
                yield event

    async def _relay(
        self, spec: ModelSpec, forward: GenerationRequest, timeout: float | None
    ) -> AsyncIterator[Chunk | Generation]:
        """Relay one replica's stream; before its first text, fail over; after
        it, resume on another replica (services.router.resume) when allowed."""
        loop = asyncio.get_running_loop()
        limit = self._deadline(timeout)
        deadline = None if limit is None else loop.time() + limit
        tried: set[Replica] = set()
        last: MeshError | None = None
        request = forward
        relayed: list[str] = []  # the text the client has received
        seam = ""  # the text received before the current replica's stream
        base = 0  # tokens relayed before the current replica's stream
        tokens = 0  # tokens relayed so far
        calls = False  # whether tool call deltas were relayed
        watch: resume.SeamStop | None = None  # a stop sequence split by the seam
        resumes = 0
        broken: MeshError | None = None  # the error that broke the stream first
        while True:
            try:
                replica = await self._pick(spec, tried, last, request)
            except MeshError:
                if broken is not None:
                    raise broken from None
                raise
            remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
            events = replica.generate_stream(request, remaining)
            try:
                with replica.track():
                    async for event in events:
                        if isinstance(event, Generation):
                            if resumes:
                                event = replace(
                                    event,
                                    text=seam + event.text,
                                    tokens=base + event.tokens,
                                    input_tokens=max(event.input_tokens - base, 0),
                                    resumes=resumes,
                                )
                            self._metrics.record_tokens(spec.id, event.input_tokens, event.tokens)
                            yield event
                            return
                        keep = watch.feed(event.text) if watch is not None else None
                        if keep is not None:
                            event = replace(event, text=event.text[:keep])
                        tokens = base + event.tokens
                        relayed.append(event.text)
                        calls = calls or bool(event.tool_calls)
                        yield replace(event, tokens=tokens) if resumes else event
                        if keep is not None:
                            await events.aclose()  # type: ignore[attr-defined]
                            yield await self._stopped_at_seam(
                                spec, forward, replica, "".join(relayed), tokens, resumes)
                            return
                return
            except MeshError as exc:
                last = exc
                if not relayed and broken is None:
                    if not self._failover(spec, replica, exc, tried):
                        raise
                    continue
                broken = broken or exc
                next_request = self._resumption(
                    spec, forward, replica, exc, tried, "".join(relayed), tokens,
                    resumes, deadline, calls,
                )
                if next_request is None:
                    raise broken from None
                request = next_request
                seam = "".join(relayed)
                watch = resume.SeamStop(seam, forward.parameters.with_defaults(spec.defaults).stop)
                base = tokens
                resumes += 1
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    async def _stopped_at_seam(
        self, spec: ModelSpec, forward: GenerationRequest, replica: Replica, text: str,
        tokens: int, resumes: int,
    ) -> Generation:
        """The last event of a resumed stream whose stop sequence the seam split
        (services.router.resume.SeamStop): no engine saw it whole, so the
        router ends the stream there. Its input tokens are the request's, as
        the replica counts them."""
        try:
            input_tokens, _ = await replica.count_tokens(forward, COUNT_TIMEOUT)
        except MeshError as exc:
            log.warning("could not count a stream's input tokens",
                        extra={"model": spec.id, "replica": replica.address,
                               "error": exc.message})
            input_tokens = 0
        self._metrics.record_tokens(spec.id, input_tokens, tokens)
        return Generation(
            text=text, model=spec.name, model_id=spec.id, tokens=tokens,
            input_tokens=input_tokens, finish_reason=FinishReason.STOP_SEQUENCE, resumes=resumes,
        )

    def _resumption(
        self, spec: ModelSpec, forward: GenerationRequest, replica: Replica, error: MeshError,
        tried: set[Replica], text: str, tokens: int, resumes: int, deadline: float | None,
        calls: bool = False,
    ) -> GenerationRequest | None:
        """The request that continues a stream `error` broke after `text` (None:
        the stream may not, or cannot, resume); `calls`: tool call deltas were
        relayed."""
        effective = forward.parameters.with_defaults(spec.defaults)
        budget = effective.max_new_tokens or self._pools[spec.id].limits.max_new_tokens
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        why = ""
        if not resume.resumable(error):
            why = "not a replica failure"
        elif not resume.allowed(forward, effective):
            why = ("the request asked for none" if forward.resume is ResumePolicy.NEVER
                   else "the request samples and did not opt in")
        elif calls:
            # The continuation would start its calls anew: the client would
            # get each call's deltas twice.
            why = "it had sent tool calls, which a continuation cannot extend"
        elif resumes >= self._max_resumes:
            why = f"already resumed {resumes} times, the limit"
        elif budget - tokens <= 0:
            why = "no tokens left in its budget"
        elif left is not None and left <= RESUME_MIN_SECONDS:
            why = "its deadline is too close"
        elif not any(r.serving and r is not replica and r not in tried
                     for r in self._pools[spec.id].replicas.values()):
            why = "no other replica serves"
        if why:
            if resume.resumable(error):
                log.warning(
                    "stream broken, not resumed",
                    extra={"model": spec.id, "replica": replica.address, "why": why,
                           "error": error.message, "tokens": tokens},
                )
            return None
        if error.reason in (Reason.BACKEND_UNAVAILABLE, Reason.MODEL_UNAVAILABLE):
            self._pools[spec.id].mark_down(replica)
        tried.add(replica)
        self._metrics.resumes.labels(self._metrics.service, spec.id, error.reason.label).inc()
        attributes = {"model": spec.id, "replica": replica.address, "error": error.message,
                      "reason": error.reason.value, "tokens": tokens, "resume": resumes + 1}
        tracing.event("llmmesh.stream.resume", attributes)
        log.warning("stream broken, resuming on another replica", extra=attributes)
        return resume.continuation(forward, text, budget - tokens)

    # -- tenancy ------------------------------------------------------------------

    async def usage(self, context: RequestContext | None) -> list[TenantUsage]:
        """Every tenant's current windows, for an admin tenant's key only."""
        caller = context.caller if context is not None else None
        if caller is None:
            raise MeshError(Reason.ADMIN_ONLY, "only an admin API key may read usage; "
                            "this mesh has no tenants")
        caller.require_admin()
        tenants = self._tenants() if self._tenants is not None else None
        if self._gate is None or tenants is None:
            return []
        return [await self._gate.store.usage(t) for t in tenants.tenants]

    @contextlib.asynccontextmanager
    async def _admission(
        self, spec: ModelSpec, forward: GenerationRequest, context: RequestContext | None
    ) -> AsyncIterator[Admission]:
        """The request's reservation and queue slot (services.tenancy.gate)."""
        assert self._gate is not None
        caller = context.caller if context is not None else None
        tenant = caller.tenant if caller is not None else ANONYMOUS
        priority = caller.priority if caller is not None else tenant.priority
        tokens = reservation(
            await self._input_tokens(spec, forward, tenant), self._max_new_tokens(spec, forward))
        async with self._gate.admit(tenant, spec.id, priority, tokens=tokens) as admission:
            if caller is not None:
                caller.admission = admission
            yield admission

    async def _input_tokens(
        self, spec: ModelSpec, forward: GenerationRequest, tenant: Tenant
    ) -> int:
        """The request's input tokens: counted by a replica's engine when the
        tenant has a token limit, else (or when no count comes) the bound."""
        limits = tenant.limits
        if limits.tokens_per_minute is None and limits.tokens_per_day is None:
            return input_estimate(forward)
        replica = self._pools[spec.id].pick(set())
        if replica is not None:
            try:
                count, _ = await replica.count_tokens(forward, COUNT_TIMEOUT)
                return count
            except MeshError as exc:
                log.warning("counting input tokens failed; reserving the bound",
                            extra={"model": spec.id, "error": exc.message})
        return input_estimate(forward)

    async def count_tokens(
        self, request: GenerationRequest, context: RequestContext | None = None
    ) -> tuple[int, bool]:
        """CountTokens: a replica of the request's model counts."""
        spec, forward = self._prepare(request, context)
        replica = await self._pick(spec, set(), None, forward)
        return await replica.count_tokens(forward, COUNT_TIMEOUT)

    @staticmethod
    def _max_new_tokens(spec: ModelSpec, forward: GenerationRequest) -> int:
        asked = forward.parameters.max_new_tokens
        return asked if asked is not None else (
            spec.defaults.max_new_tokens or spec.limits.max_new_tokens)

    def _update_capacity(self) -> None:
        """Each model's slots: per serving replica, less what other callers
        hold on its engine as the engine reported."""
        assert self._gate is not None
        for spec in self._registry.models:
            queue = self._gate.queues.get(spec.id)
            if queue is None:
                continue
            replicas = [
                (r.serving, (r.load.running + r.load.waiting) if r.load is not None else None,
                 r.in_flight_at_report)
                for r in self._pools[spec.id].replicas.values()
            ]
            # A model with no serving replica keeps one slot: its requests
            # get MODEL_UNAVAILABLE at once instead of waiting for a slot.
            queue.set_capacity(max(1, model_capacity(self._slots[spec.id], replicas)))

    # -- health -------------------------------------------------------------------

    async def refresh(self, timeout: float = 1.0) -> None:
        """One health round over every model; one model's failure is its own."""
        pools = list(self._pools.values())
        results = await asyncio.gather(
            *(pool.refresh(timeout) for pool in pools), return_exceptions=True
        )
        for pool, result in zip(pools, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                log.error("health round failed for a model", exc_info=result,
                          extra={"model": pool.model_id})
        if self._gate is not None:
            self._update_capacity()
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
        raise model_down(spec.id, pool.down_since)

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

    def _admit(self, spec: ModelSpec) -> Counted:
        """The request counted against the router's and the model's bounds
        while it runs."""
        if self._in_flight[TOTAL] >= self._max_total:
            # What one router relays at its pace (`make bench`: time to first
            # token doubles past a few hundred streams on two cores): refused
            # at once, before any work for it is done.
            raise MeshError(
                Reason.OVERLOADED,
                f"the router has {self._max_total} requests in flight, its limit; "
                "retry shortly",
                metadata={"model_id": spec.id, "limit": str(self._max_total)},
                retry_after=1.0,
            )
        if self._in_flight[spec.id] >= self._max_in_flight:
            raise MeshError(
                Reason.OVERLOADED,
                f"model {spec.id} has {self._max_in_flight} requests in flight at the router, "
                "its limit; retry shortly",
                metadata={"model_id": spec.id, "limit": str(self._max_in_flight)},
                retry_after=1.0,
            )
        return Counted(self._in_flight, spec.id)

    def initial_slots(self) -> dict[str, int]:
        """Each model's slots before the first health round: every replica serving."""
        return {
            spec.id: self._slots[spec.id] * max(1, len(spec.adapters))
            for spec in self._registry.models
        }

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




def input_estimate(request: GenerationRequest) -> int:
    """At least as many input tokens as the rendered prompt has (see
    services.tenancy.tokens); settling gives the excess back."""
    if request.messages:
        return conversation_upper_bound((m.role, m.content) for m in request.messages)
    return upper_bound(request.inputs)
