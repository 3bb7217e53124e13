"""The router's queue in front of one model: who gets the next free slot.

A model has `capacity` slots (slots per replica times serving replicas, less
what other callers hold on its engines). While a slot is free a request takes
it at once; when none is, requests wait and each freed slot goes to:

1. the most urgent priority band with anyone waiting (interactive >
   standard > batch), strictly;
2. within the band, the tenant whose turn it is by weighted fair share:
   start-time fair queuing. Each tenant's requests carry virtual start and
   finish tags (start = max(the band's virtual time, the tenant's last
   finish), finish = start + cost / weight); the smallest start tag goes
   first and the band's virtual time becomes it. `cost` is what the caller
   says a request costs: the router passes its reserved tokens (input + the
   most it may generate), so shares are shares of tokens; 1 makes them
   shares of requests. A tenant that was idle starts at the band's virtual
   time, so idleness banks no credit;
3. within a tenant, first come first served (its tags only grow).

Headroom, adaptive: the batch band may hold every slot but those the other
bands (interactive and standard) used lately: the most of them in use at
once within the last `memory` seconds (or now), at most `headroom` (0 by
default: no slot is ever held back). An urgent request then starts at once
in a held slot instead of waiting for a batch request to end, and the price
is exactly the slots urgent callers really use: while none has come for
`memory` seconds nothing is held, so a lone batch tenant gets the whole model
(the first urgent request after such a spell waits for one batch request to
end, and from then on its band's slots are held). Work conserving otherwise:
a slot never stays free while anyone it is not held from waits. The queue is
bounded (OVERLOADED beyond it) and a waiter gives up after `timeout`
(QUEUE_TIMEOUT); both say when to retry, from the rate at which slots were
freed lately. A waiter that is cancelled or times out leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.common.errors import MeshError, Reason
from services.tenancy.priority import Priority

# Retry hints are clipped to this range (seconds).
MIN_RETRY, MAX_RETRY = 1.0, 60.0


@dataclass(order=True)
class _Waiter:
    start: float
    serial: int
    tenant: str = field(compare=False)
    finish: float = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    gone: bool = field(default=False, compare=False)


@dataclass
class _Band:
    """One priority band: its virtual time, tenants' last finish tags, its heap."""

    vtime: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)
    heap: list[_Waiter] = field(default_factory=list)
    waiting: int = 0

    def tags(self, tenant: str, cost: float, weight: float) -> tuple[float, float]:
        start = max(self.vtime, self.finish.get(tenant, 0.0))
        finish = start + cost / weight
        self.finish[tenant] = finish
        return start, finish

    def pop(self) -> _Waiter | None:
        """The next waiter still waiting. One whose task was cancelled has a
        cancelled future before its task runs again to leave: it is skipped
        here and counted out when it leaves."""
        while self.heap:
            waiter = heapq.heappop(self.heap)
            if not waiter.gone and not waiter.future.done():
                return waiter
        return None

    def forget_idle(self) -> None:
        """Drop finish tags no longer ahead of the virtual time (they would
        change nothing): the map stays as small as the set of busy tenants."""
        for tenant in [t for t, f in self.finish.items() if f <= self.vtime]:
            del self.finish[tenant]


@dataclass(frozen=True)
class QueueStats:
    model: str
    capacity: int
    in_use: int
    waiting: dict[str, int]  # band label -> waiters


class AdmissionQueue:
    def __init__(
        self,
        model: str,
        capacity: int,
        *,
        max_waiting: int = 1024,
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        headroom: int = 0,
        memory: float = 3.0,
    ) -> None:
        self.model = model
        self._headroom = max(0, headroom)
        self._memory = memory
        self._batch = 0  # slots held by batch requests
        # (when, how many slots the urgent bands held then), kept as a sliding
        # maximum: each entry's count exceeds every later one's.
        self._urgent_peaks: deque[tuple[float, int]] = deque()
        # A wake-up for when held slots lapse while batch waits for them.
        self._wake: asyncio.TimerHandle | None = None
        self._capacity = max(0, capacity)
        self._max_waiting = max_waiting
        self._timeout = timeout
        self._clock = clock
        self._in_use = 0
        self._bands = {p: _Band() for p in Priority}
        self._serial = itertools.count()
        self._freed: deque[float] = deque(maxlen=64)  # when slots were freed lately

    # -- state --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(b.waiting for b in self._bands.values())

    @property
    def held(self) -> int:
        """The slots the batch band may not take now (see the module's text)."""
        if not self._headroom:
            return 0
        horizon = self._clock() - self._memory
        while self._urgent_peaks and self._urgent_peaks[0][0] < horizon:
            self._urgent_peaks.popleft()
        recent = self._urgent_peaks[0][1] if self._urgent_peaks else 0
        return min(self._headroom, max(recent, self._in_use - self._batch))

    def stats(self) -> QueueStats:
        return QueueStats(
            self.model, self._capacity, self._in_use,
            {p.label: b.waiting for p, b in self._bands.items()},
        )

    def set_capacity(self, capacity: int) -> None:
        """New slot count (replicas came or went, engines report other load);
        slots above it empty as their requests end."""
        self._capacity = max(0, capacity)
        self._dispatch()

    # -- admission ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(
        self, tenant: str, priority: Priority, *, weight: float = 1.0, cost: float = 1.0,
        timeout: float | None = None,
    ) -> AsyncIterator[float]:
        """Hold one of the model's slots for the body; yields the seconds waited."""
        waited = await self.acquire(tenant, priority, weight=weight, cost=cost, timeout=timeout)
        try:
            yield waited
        finally:
            self.release(priority)

    async def acquire(
        self, tenant: str, priority: Priority, *, weight: float = 1.0, cost: float = 1.0,
        timeout: float | None = None,
    ) -> float:
        """Take a slot, waiting by priority and fair share; the seconds waited.
        Call release() exactly once after a successful acquire."""
        band = self._bands[priority]
        cost = max(cost, 1e-9)
        weight = max(weight, 1e-9)
        if self.waiting == 0 and self._may_take(priority):
            start, _ = band.tags(tenant, cost, weight)
            band.vtime = max(band.vtime, start)
            self._take(priority)
            return 0.0
        if self.waiting >= self._max_waiting:
            raise MeshError(
                Reason.OVERLOADED,
                f"model {self.model} has {self.waiting} requests waiting, the queue's "
                "limit; retry later",
                metadata={"model_id": self.model, "limit": str(self._max_waiting)},
                retry_after=self._retry_hint(self.waiting),
            )
        start, finish = band.tags(tenant, cost, weight)
        waiter = _Waiter(
            start, next(self._serial), tenant, finish, asyncio.get_running_loop().create_future()
        )
        heapq.heappush(band.heap, waiter)
        band.waiting += 1
        began = self._clock()
        self._dispatch()  # capacity may be free while others wait behind a cap change
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await waiter.future
        except TimeoutError:
            if self._leave(band, waiter):
                raise MeshError(
                    Reason.QUEUE_TIMEOUT,
                    f"model {self.model} stayed saturated: waited {limit:g} s in its queue "
                    "without a free slot; retry later",
                    metadata={"model_id": self.model, "priority": priority.label,
                              "waited_seconds": f"{limit:g}"},
                    retry_after=self._retry_hint(self.waiting),
                ) from None
        except BaseException:
            # Cancelled: leave at once; a slot handed over meanwhile goes back.
            if not self._leave(band, waiter):
                self.release(priority)
            raise
        return self._clock() - began

    def release(self, priority: Priority) -> None:
        """Give back a slot that a request of `priority` held; the next waiter
        (if any) takes it."""
        if priority is Priority.BATCH:
            self._batch = max(0, self._batch - 1)
        else:
            self._note_urgent()  # the level held until now counts from now
        self._in_use = max(0, self._in_use - 1)
        self._freed.append(self._clock())
        self._dispatch()

    def _take(self, priority: Priority) -> None:
        self._in_use += 1
        if priority is Priority.BATCH:
            self._batch += 1
        else:
            self._note_urgent()

    def _note_urgent(self) -> None:
        """Remember how many slots the urgent bands hold at this moment (on
        taking one, and just before giving one back)."""
        urgent, now = self._in_use - self._batch, self._clock()
        while self._urgent_peaks and self._urgent_peaks[-1][1] <= urgent:
            self._urgent_peaks.pop()
        self._urgent_peaks.append((now, urgent))

    def _leave(self, band: _Band, waiter: _Waiter) -> bool:
        """Take a waiter out; False when it had been given a slot already."""
        if waiter.future.done() and not waiter.future.cancelled():
            return False
        waiter.gone = True
        band.waiting -= 1
        if len(band.heap) > 2 * band.waiting + 64:
            # Waiters that left stay in the heap until popped: drop them now
            # and then, so a long saturated spell cannot grow it without bound.
            band.heap = [w for w in band.heap if not w.gone]
            heapq.heapify(band.heap)
        if band.finish.get(waiter.tenant) == waiter.finish:
            # Its last request left: its tag goes back, so it is not charged for it.
            band.finish[waiter.tenant] = waiter.start
        if not waiter.future.done():
            waiter.future.cancel()
        return True

    def _may_take(self, priority: Priority) -> bool:
        """Whether a request of `priority` may take a slot now: any free one,
        but batch leaves the held slots (and always has one slot when the
        model has any)."""
        if self._in_use >= self._capacity:
            return False
        if priority is Priority.BATCH and self._headroom:
            return self._batch < max(min(1, self._capacity), self._capacity - self.held)
        return True

    def _dispatch(self) -> None:
        while self._in_use < self._capacity:
            waiter = None
            for priority, band in self._bands.items():  # in priority order
                if band.waiting and self._may_take(priority):
                    waiter = band.pop()
                    if waiter is not None:
                        band.waiting -= 1
                        band.vtime = max(band.vtime, waiter.start)
                        band.forget_idle()
                        break
            if waiter is None:
                self._wake_when_held_lapse()
                return
            self._take(priority)
            waiter.future.set_result(None)

    def _wake_when_held_lapse(self) -> None:
        """Batch waits while slots are free but held: dispatch again when the
        oldest urgent peak leaves the memory, so a held slot cannot stay idle
        because no request happened to end."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        batch = self._bands[Priority.BATCH]
        if not (batch.waiting and self._in_use < self._capacity and self._urgent_peaks):
            return
        with contextlib.suppress(RuntimeError):  # no loop: nothing waits either
            delay = self._urgent_peaks[0][0] + self._memory - self._clock()
            self._wake = asyncio.get_running_loop().call_later(
                max(0.0, delay) + 0.001, self._dispatch)

    def _retry_hint(self, ahead: int) -> float:
        """Seconds until about `ahead` slots will have been freed, at the rate
        slots were freed lately."""
        if len(self._freed) >= 2:
            span = self._freed[-1] - self._freed[0]
            if span > 0:
                rate = (len(self._freed) - 1) / span
                return min(MAX_RETRY, max(MIN_RETRY, (ahead + 1) / rate))
        return MIN_RETRY
