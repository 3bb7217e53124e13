"""Bookkeeping of one call, whatever its transport: timing, the in-flight
gauge, the outcome's metrics and one structured log line.

The gRPC interceptor (services.common.rpc_interceptor) and the OpenAI-compatible
HTTP face (services.openai) keep their books here, so both APIs feed the
same series and write the same log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from services.common import logs
from services.common.errors import Reason
from services.common.metrics import Metrics

log = logging.getLogger("llmmesh.rpc")


class CallRecord:
    """One call: started when built, ended by exactly one `finish()`."""

    def __init__(
        self,
        metrics: Metrics,
        method: str,
        model: str,
        scenario: str,
        peer: Callable[[], str],
        fields: Mapping[str, object] | None = None,
        quiet: bool = False,
    ) -> None:
        self._m = metrics
        # A poll (the router asking an adapter for its model once a second):
        # its successful calls are logged at debug, like health checks.
        self._quiet = quiet
        self._method = method
        self._model = model
        self._scenario = scenario
        self._peer = peer
        self._fields = fields
        self._start = time.perf_counter()
        self._first: float | None = None
        self.finished = False
        self._series = metrics.series(model, method, scenario)
        self._series.in_flight.inc()

    def first_token(self) -> None:
        self._first = time.perf_counter()
        self._series.ttft.observe(self._first - self._start)

    def finish(
        self,
        code: str,
        *,
        reason: Reason | None = None,
        message: str = "",
        tokens: int | None = None,
    ) -> None:
        m = self._m
        self.finished = True
        elapsed = time.perf_counter() - self._start
        series = self._series
        series.in_flight.dec()
        if code == "OK":
            series.ok.inc()
        else:
            m.requests.labels(m.service, self._model, self._scenario, self._method, code).inc()
        series.duration.observe(elapsed)
        if reason is not None:
            m.errors.labels(m.service, self._model, reason.label).inc()
        if self._first is not None and tokens and tokens > 1:
            per_token = (time.perf_counter() - self._first) / (tokens - 1)
            series.tpot.observe(per_token)
        fields: dict[str, object] = {
            "method": self._method,
            "model": self._model,
            "scenario": self._scenario,
            "code": code,
            "duration_ms": round(elapsed * 1000, 2),
            "peer": self._peer(),
        }
        if self._fields:
            fields.update(self._fields)
        if reason is not None:
            fields["reason"] = reason.value
            fields["error"] = message
        if tokens is not None:
            fields["tokens"] = tokens
        if self._quiet and code == "OK":
            log.debug("rpc", extra={"fields": fields})
        else:
            logs.info(log, "rpc", fields)
