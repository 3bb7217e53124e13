"""Waiting for a condition that becomes true on its own (a process comes up,
a counter moves), polling instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def eventually(
    condition: Callable[[], object], timeout: float = 15.0, what: str = "the condition",
    *, step: float = 0.05,
) -> float:
    """Poll `condition` until it is true; the seconds that took. Fails naming
    `what` when it is still false after `timeout` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            assert condition(), f"{what}: not true after {timeout}s"
            break
        time.sleep(step)
    return time.monotonic() - started


async def eventually_async(
    condition: Callable[[], Awaitable[object]], timeout: float = 3.0,
    what: str = "the condition", *, step: float = 0.02,
) -> float:
    """`eventually` for a coroutine predicate, without blocking the event loop."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            assert await condition(), f"{what}: not true after {timeout}s"
            break
        await asyncio.sleep(step)
    return time.monotonic() - started
