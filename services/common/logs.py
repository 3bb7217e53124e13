"""Structured logs: one JSON object per line on stdout."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# Fields of the request being served (trace_id, span_id), added to every line;
# set by services.common.tracing while tracing is on.
context_fields: Callable[[], dict[str, str]] | None = None


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key == "fields" and isinstance(value, dict):
                entry.update(value)  # extra={"fields": {...}}, for keys chosen at run time
            elif key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if context_fields is not None:
            entry.update(context_fields())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup(service: str, level: str = "info") -> None:
    """Route every logger to stdout as JSON lines tagged with `service`.

    Called from a service's `__main__` only: importing this module changes
    nothing, so tests keep pytest's own log capture.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates the per-request lines the services write.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
