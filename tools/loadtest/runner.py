"""Run one step of a sweep: send requests on schedule, within the bounds, and record them.

A step ends when it has sent `requests` requests or when `duration`
seconds have passed since its first send, whichever comes first; requests
in flight then finish (each within `request_timeout`). Nothing is retried:
a 429 is a result, counted as such.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import aiohttp
import grpc

from tools.loadtest.arrivals import Step, gaps
from tools.loadtest.clients import Client, Record
from tools.loadtest.workload import Item


@dataclass(frozen=True)
class Bounds:
    requests: int  # per step
    duration: float  # seconds per step, from the first send
    request_timeout: float  # seconds per request
    max_concurrency: int | None = None  # a cap on requests in flight at a rate


class Progress:
    """One line on a terminal, redrawn a few times a second; quiet elsewhere."""

    def __init__(self, out: TextIO | None, label: str, bounds: Bounds) -> None:
        self.out = out
        self.label = label
        self.bounds = bounds
        self.started = time.monotonic()
        self.shown = 0.0
        self.done = self.failed = self.sent = 0

    def update(self, record: Record | None = None, force: bool = False) -> None:
        if record is not None:
            self.done += 1
            self.failed += not record.ok
        if self.out is None:
            return
        now = time.monotonic()
        if not force and now - self.shown < 0.2:
            return
        self.shown = now
        elapsed = now - self.started
        share = max(self.done / self.bounds.requests, min(1.0, elapsed / self.bounds.duration))
        width = 24
        bar = "#" * int(share * width) + "." * (width - int(share * width))
        self.out.write(f"\r{self.label:<18} [{bar}] {self.done}/{self.bounds.requests} "
                       f"done, {self.sent - self.done} in flight, {self.failed} failed, "
                       f"{elapsed:5.1f}s ")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.update(force=True)
            self.out.write("\n")
            self.out.flush()


async def _one(client: Client, item: Item, timeout: float, progress: Progress,
               due: float | None = None) -> Record:
    """One request; its clock starts when it was `due` (at a rate, its arrival
    time, before any wait for a free slot under --max-concurrency), else now."""
    record = Record(model=item.model or "", turn=item.turn,
                    start=due if due is not None else time.perf_counter())
    try:
        await asyncio.wait_for(client.run(item, record), timeout)
    except TimeoutError:
        record.fail("timeout")
    except (aiohttp.ClientError, grpc.RpcError, OSError) as exc:
        record.fail(f"connection {exc.__class__.__name__}")
    except Exception as exc:  # a reply that is not what the API promises: one failure
        record.fail(f"bad reply {exc.__class__.__name__}")
    if not record.end:
        record.end = time.perf_counter()
    progress.update(record)
    return record


async def run_step(
    client: Client, items: Iterator[Item], step: Step, bounds: Bounds, *,
    seed: int = 0, burstiness: float = 1.0, progress_out: TextIO | None = sys.stderr,
    label: str | None = None,
) -> list[Record]:
    """Every request of one step, in the order they were sent."""
    progress = Progress(progress_out, label or step.label, bounds)
    started = time.perf_counter()
    deadline = started + bounds.duration
    try:
        if step.mode == "concurrency":
            return await _closed_loop(client, items, int(step.value), bounds, deadline, progress)
        return await _open_loop(client, items, step.value, burstiness, bounds, deadline,
                                progress, random.Random(seed))
    finally:
        progress.close()


async def _closed_loop(client: Client, items: Iterator[Item], concurrency: int, bounds: Bounds,
                       deadline: float, progress: Progress) -> list[Record]:
    records: list[Record] = []

    async def worker() -> None:
        while progress.sent < bounds.requests and time.perf_counter() < deadline:
            progress.sent += 1
            records.append(await _one(client, next(items), bounds.request_timeout, progress))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r.start)


async def _open_loop(client: Client, items: Iterator[Item], rate: float, burstiness: float,
                     bounds: Bounds, deadline: float, progress: Progress,
                     rng: random.Random) -> list[Record]:
    limit = asyncio.Semaphore(bounds.max_concurrency) if bounds.max_concurrency else None
    tasks: list[asyncio.Task[Record]] = []

    async def limited(item: Item, due: float) -> Record:
        if limit is None:
            return await _one(client, item, bounds.request_timeout, progress, due)
        async with limit:  # the wait for a slot counts in the request's latency
            return await _one(client, item, bounds.request_timeout, progress, due)

    next_at = time.perf_counter()
    for gap in gaps(rate, burstiness, rng):
        if progress.sent >= bounds.requests:
            break
        next_at += gap
        wait = next_at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.perf_counter() >= deadline:
            break
        progress.sent += 1
        tasks.append(asyncio.create_task(limited(next(items), min(next_at, time.perf_counter()))))
        progress.update()
    records = await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.start)
