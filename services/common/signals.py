"""Serving until SIGTERM or SIGINT, then a graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from services.common.grpc_server import RunningServer

log = logging.getLogger("llmmesh.rpc")


async def serve_until_signalled(
    running: RunningServer,
    grace: float,
    watch: Coroutine[Any, Any, None],
    on_stop: Callable[[], Awaitable[None]],
) -> None:
    """Serve, with `watch` (the health loop) running, until SIGTERM or SIGINT;
    then shut down gracefully: health first, open streams within `grace`,
    the health loop, and last `on_stop` (close clients)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch)
    settle_garbage_collector()
    log.info("serving", extra={"port": running.port})
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": grace})
    await running.stop(grace)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await on_stop()
    log.info("stopped")


# Allocations between two collections of the youngest generation (Python's
# default is 700): a request allocates a few hundred objects, nearly all
# freed by reference counting, so collecting every few requests costs CPU
# and finds next to nothing.
GC_THRESHOLD = (20_000, 20, 20)


def settle_garbage_collector() -> None:
    """Once started: move everything alive (modules, registry, servers) out of
    the collector's sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
