"""The engine's load, sampled from its Prometheus metrics at a short interval.

The adapter reports the latest sample to the router (in its model info), so
the router can see load it did not cause itself: another router's requests,
or traffic that reaches the engine another way. Gauges whose names are in
LOAD_METRICS are summed over their label sets (vLLM labels by engine index);
an engine that serves no metrics, or a sample older than `max_age`, reports
nothing, and the router falls back to its own counts. An engine that answers
404 (or 405) before any load was seen has no /metrics: the sampler says so
once in the log and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import aiohttp

from services.common.types import EngineLoad

log = logging.getLogger("llmmesh.adapter")

# Metric name -> what it measures: "waiting", "running" or "kv" (0..1).
LOAD_METRICS: Mapping[str, str] = {
    # TGI's router, and the CPU backend, which exports the same names.
    "tgi_queue_size": "waiting",
    "tgi_batch_current_size": "running",
    # vLLM (vllm/v1/metrics/loggers.py: PrometheusStatLogger).
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:gpu_cache_usage_perc": "kv",  # its name before vLLM 0.9
    # llama.cpp's llama-server, when started with --metrics.
    "llamacpp:requests_deferred": "waiting",
    "llamacpp:requests_processing": "running",
    # SGLang's scheduler gauges.
    "sglang:num_queue_reqs": "waiting",
    "sglang:num_running_reqs": "running",
    "sglang:token_usage": "kv",
}


# Statuses of a server without /metrics: sampling stops after one.
NO_METRICS = (404, 405)


def parse_load(text: str) -> EngineLoad | None:
    """The load in a Prometheus text exposition, or None when it has none of
    LOAD_METRICS. A line scan: the engines' pages run to hundreds of lines
    of histograms, and only a few gauges matter here."""
    sums = {"waiting": 0.0, "running": 0.0}
    kv: float | None = None
    seen = False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = len(line)
        for stop in ("{", " "):
            i = line.find(stop)
            if 0 < i < end:
                end = i
        what = LOAD_METRICS.get(line[:end])
        if what is None:
            continue
        try:
            rest = line[line.rindex("}") + 1 :] if line[end] == "{" else line[end:]
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        seen = True
        if what == "kv":
            kv = max(kv or 0.0, value)  # the fullest engine of the server
        else:
            sums[what] += value
    if not seen:
        return None
    return EngineLoad(waiting=int(sums["waiting"]), running=int(sums["running"]),
                      kv_cache_usage=kv)


class LoadSampler:
    """Samples `url` every `interval` seconds; `current` is the latest load,
    or None when the engine reports none or the last good sample is stale."""

    def __init__(self, url: str, interval: float, *, max_age: float | None = None) -> None:
        self.url = url
        self.interval = interval
        self.max_age = max_age if max_age is not None else max(3 * interval, 2.0)
        self._load: EngineLoad | None = None
        self._at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._warned = False
        # Set when the engine answers that it has no /metrics at all (404 or
        # 405 before any load was seen): sampling stops.
        self.absent = False

    @property
    def current(self) -> EngineLoad | None:
        if self._load is None or time.monotonic() - self._at > self.max_age:
            return None
        return self._load

    async def sample(self) -> EngineLoad | None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                self.url, timeout=aiohttp.ClientTimeout(total=max(self.interval, 1.0))
            ) as resp:
                if resp.status in NO_METRICS and self._load is None:
                    self.absent = True
                    log.info(
                        "the engine serves no metrics; its load is not sampled",
                        extra={"url": self.url, "status": resp.status},
                    )
                    return None
                text = await resp.text() if resp.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            return None
        load = parse_load(text)
        if load is None and not self._warned:
            self._warned = True
            log.info("the engine reports no load", extra={"url": self.url})
        if load is not None:
            self._load, self._at = load, time.monotonic()
        return load

    async def run(self) -> None:
        """Sample until cancelled, or until the engine says it has no metrics
        (llama-cpp-python's server, a llama-server without --metrics)."""
        while not self.absent:
            await self.sample()
            if self.absent:
                await self.close()
                return
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
