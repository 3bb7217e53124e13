"""The cache-aware choice's counters, read from each pool at scrape time.

The choice keeps plain integers (services.router.prefix_choice.PrefixStats);
this collector turns them into counters when Prometheus scrapes, so routing
a request costs no metric update:

- llmmesh_router_prefix_requests_total: requests routed by the cache-aware choice;
- llmmesh_router_prefix_hits_total: those sent to a replica whose index
  matched part of their prefix (the hit share is hits / requests);
- llmmesh_router_prefix_could_hit_total: those for which some replica matched;
- llmmesh_router_prefix_blocks_total / _matched_blocks_total: the prompts'
  blocks, and those matched on the chosen replica (the expected share of
  prompt text the engines reuse).

Engines count their own reuse (vLLM's prefix_cache_hits, the CPU backend's
llmmesh_cpu_prefix_cache_hits_total); docs/performance.md shows how the two compare.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.router.pool import ReplicaPool

_SERIES = (
    ("requests", "Requests the cache-aware choice routed."),
    ("hits", "Requests sent to a replica whose prefix index matched."),
    ("could_hit", "Requests for which some replica's prefix index matched."),
    ("blocks", "Blocks of the routed prompts' canonical text."),
    ("matched_blocks", "Blocks matched on the chosen replica."),
)


class PrefixCollector(Collector):
    def __init__(self, pools: Mapping[str, ReplicaPool], service: str) -> None:
        self._pools = pools
        self._service = service

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc in _SERIES:
            family = CounterMetricFamily(
                f"llmmesh_router_prefix_{name}", doc, labels=["service", "model"]
            )
            for model_id, pool in self._pools.items():
                if pool.prefix is not None:
                    family.add_metric([self._service, model_id], getattr(pool.prefix.stats, name))
            yield family


def register(registry: CollectorRegistry, pools: Mapping[str, ReplicaPool], service: str) -> None:
    registry.register(PrefixCollector(pools, service))
