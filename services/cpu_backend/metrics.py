"""TGI's Prometheus metrics, in a registry owned by one app.

Names, labels and histogram buckets follow TGI's router (server.rs), so a
dashboard or alert written against a GPU TGI works unchanged here. There is
no model label: per-model series come from the adapters.

TGI's exporter writes counters WITHOUT the `_total` suffix
(`tgi_request_count 3`), while prometheus_client's Counter always appends it.
To keep TGI's series names, counters are exposed by a small collector as
untyped samples with the exact TGI names; gauges and histograms use the
library's classes. The prefix cache's two counters are ours (TGI exports
none): `llmmesh_cpu_prefix_cache_queries_total` and `..._hits_total`, in
prompt tokens like vLLM's `vllm:prefix_cache_queries` / `_hits`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
FAILURE_LABELS: Final = ("validation", "overloaded", "generation", "incomplete", "dropped")


def _duration_buckets() -> list[float]:
    # TGI: 35 buckets, geometric from 0.0001 * 1.5.
    value, buckets = 0.0001, []
    for _ in range(35):
        value *= 1.5
        buckets.append(value)
    return buckets


def _linear_buckets(maximum: int) -> list[float]:
    # TGI: 100 equal buckets up to the configured maximum.
    return [maximum / 100.0 * (i + 1) for i in range(100)]


class _RequestCounters(Collector):
    """tgi_request_count, tgi_request_success and tgi_request_failure{err}."""

    def __init__(self) -> None:
        self.count = 0
        self.success = 0
        self.failure = dict.fromkeys(FAILURE_LABELS, 0)

    def collect(self) -> Iterator[Metric]:
        count = Metric("tgi_request_count", "Total number of requests", "unknown")
        count.add_sample("tgi_request_count", {}, self.count)
        success = Metric("tgi_request_success", "Number of successful requests", "unknown")
        success.add_sample("tgi_request_success", {}, self.success)
        failure = Metric("tgi_request_failure", "Number of failed requests", "unknown")
        for label, value in self.failure.items():
            failure.add_sample("tgi_request_failure", {"err": label}, value)
        yield from (count, success, failure)


class Metrics:
    """All metrics of one server instance; never touches the global registry."""

    def __init__(self, *, max_input_tokens: int, max_total_tokens: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = _RequestCounters()
        self.registry.register(self._counters)
        reg = self.registry
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=reg)
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Current batch size", registry=reg
        )
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Maximum tokens for the current batch", registry=reg
        )
        durations = _duration_buckets()
        self.request_duration = Histogram(
            "tgi_request_duration",
            "Total time spent processing the request",
            buckets=durations,
            registry=reg,
        )
        self.validation_duration = Histogram(
            "tgi_request_validation_duration",
            "Time spent validating the request",
            buckets=durations,
            registry=reg,
        )
        self.queue_duration = Histogram(
            "tgi_request_queue_duration",
            "Time spent in the queue per request",
            buckets=durations,
            registry=reg,
        )
        self.inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Request inference duration",
            buckets=durations,
            registry=reg,
        )
        self.mean_time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean time per token per request",
            buckets=durations,
            registry=reg,
        )
        self.input_length = Histogram(
            "tgi_request_input_length",
            "Input token length per request",
            buckets=_linear_buckets(max_input_tokens),
            registry=reg,
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            buckets=_linear_buckets(max_total_tokens),
            registry=reg,
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "Maximum new tokens per request",
            buckets=_linear_buckets(max_total_tokens),
            registry=reg,
        )

        # Prefix cache, in prompt tokens, like vLLM's vllm:prefix_cache_queries
        # and vllm:prefix_cache_hits (TGI exports none): hits / queries is the
        # share of prompt tokens whose prefill was skipped.
        self.prefix_cache_queries = Counter(
            "llmmesh_cpu_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            registry=reg,
        )
        self.prefix_cache_hits = Counter(
            "llmmesh_cpu_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (prefill skipped)",
            registry=reg,
        )

    def prefix_cache(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)

    def request(self) -> None:
        self._counters.count += 1

    def success(self) -> None:
        self._counters.success += 1

    def failure(self, label: str) -> None:
        self._counters.failure[label] += 1

    @property
    def request_count(self) -> int:
        return self._counters.count

    @property
    def success_count(self) -> int:
        return self._counters.success

    def failures(self) -> dict[str, int]:
        return dict(self._counters.failure)

    def render(self) -> bytes:
        return generate_latest(self.registry)
