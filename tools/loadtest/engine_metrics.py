"""The engines' own prefix-cache figures, read from their Prometheus /metrics
before and after a step: the share of prompt tokens their caches served.

Counters read (every series of a name is summed, whatever its labels):
- llmmesh's CPU backend: llmmesh_cpu_prefix_cache_queries_total and
  llmmesh_cpu_prefix_cache_hits_total;
- vLLM: vllm:prefix_cache_queries_total and vllm:prefix_cache_hits_total.
An engine without them (TGI, the doubles, a server that exposes no /metrics)
gives no figure: "n/a", never a guess.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# engine family -> (queries counter, hits counter)
CACHE_COUNTERS = {
    "llmmesh_cpu": ("llmmesh_cpu_prefix_cache_queries_total",
                    "llmmesh_cpu_prefix_cache_hits_total"),
    "vllm": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


def parse_counters(text: str, names: set[str]) -> dict[str, float]:
    """The sum over series of each of `names` in Prometheus' text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            out[match.group(1)] = out.get(match.group(1), 0.0) + value
    return out


@dataclass(frozen=True)
class CacheSample:
    """Queries and hits per engine URL at one moment; a URL absent had no counters."""

    # url -> (engine family, queries, hits)
    counts: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # url -> why it gave nothing


def counts_of(text: str) -> tuple[str, float, float] | None:
    """(family, queries, hits) from one engine's /metrics, or None without counters."""
    wanted = {name for pair in CACHE_COUNTERS.values() for name in pair}
    values = parse_counters(text, wanted)
    for family, (queries, hits) in CACHE_COUNTERS.items():
        if queries in values:
            return family, values[queries], values.get(hits, 0.0)
    return None


class CacheMetrics:
    """Reads the engines' /metrics URLs (none: every figure is n/a)."""

    def __init__(self, urls: Sequence[str], timeout: float = 5.0) -> None:
        self.urls = tuple(urls)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def sample(self) -> CacheSample:
        if not self.urls:
            return CacheSample()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        results = await asyncio.gather(*(self._one(u) for u in self.urls))
        counts = {u: c for u, c, _ in results if c is not None}
        errors = {u: e for u, _, e in results if e}
        return CacheSample(counts, errors)

    async def _one(self, url: str) -> tuple[str, tuple[str, float, float] | None, str]:
        assert self._session is not None
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return url, None, f"HTTP {resp.status}"
                found = counts_of(await resp.text())
                return url, found, "" if found else "no prefix-cache counters"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return url, None, f"unreachable ({exc.__class__.__name__})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def cache_figures(before: CacheSample, after: CacheSample) -> dict[str, Any]:
    """The step's share of prompt tokens served from the engines' caches:
    hits / queries over the step, summed over the engines that report both
    samples; `hit_share` None ("n/a") when none does or nothing was queried."""
    queries = hits = 0.0
    engines: dict[str, Any] = {}
    for url, (family, q1, h1) in after.counts.items():
        start = before.counts.get(url)
        if start is None:
            engines[url] = {"engine": family, "hit_share": None}
            continue
        dq, dh = max(0.0, q1 - start[1]), max(0.0, h1 - start[2])  # a restart resets them
        queries += dq
        hits += dh
        engines[url] = {"engine": family, "queries": dq, "hits": dh,
                        "hit_share": round(dh / dq, 4) if dq else None}
    for url, why in {**before.errors, **after.errors}.items():
        engines.setdefault(url, {"engine": None, "hit_share": None, "why": why})
    return {"hit_share": round(hits / queries, 4) if queries else None,
            "queries": queries, "hits": hits, "engines": engines}


def shown(figures: dict[str, Any] | None) -> str:
    """`83.2%` or `n/a`."""
    share = (figures or {}).get("hit_share")
    return "n/a" if share is None else f"{share * 100:.1f}%"
