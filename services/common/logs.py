"""Structured logs: one JSON object per line on stdout."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# Fields of the request being served (trace_id, span_id), added to every line;
# set by services.common.tracing while tracing is on.
context_fields: Callable[[], dict[str, str]] | None = None


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        self._second = -1
        self._stamp = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def line(self, logger: str, msg: str, fields: Mapping[str, object]) -> str:
        """An INFO line of `fields`, as `format` writes it for such a record."""
        entry: dict[str, object] = {
            "ts": self._ts(time.time()),
            "level": "info",
            "service": self._service,
            "logger": logger,
            "msg": msg,
        }
        entry.update(fields)
        if context_fields is not None:
            entry.update(context_fields())
        return json.dumps(entry, default=str, ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self._ts(record.created),
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


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes formatted lines to a stream; lines logged from an event loop are
    written together once the loop's current callbacks have run, so a busy
    service makes one write for many log lines instead of one each."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        """Write one formatted line (soon, from an event loop)."""
        self.acquire()
        try:
            line += "\n"
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: at once
                self._pending.append(line)
                self._write()
                return
            if not self._pending:
                loop.call_soon(self.flush)
            self._pending.append(line)
        finally:
            self.release()

    def _write(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            self.stream.write("".join(lines))
            self.stream.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()


# The handler and formatter `setup` installed: `info` writes through them
# without building a LogRecord.
_direct: tuple[LineHandler, JsonFormatter] | None = None


def info(logger: logging.Logger, msg: str, fields: Mapping[str, object]) -> None:
    """Log `msg` with `fields` at INFO: the line `logger.info(msg, extra=
    {"fields": fields})` writes, made directly when the process logs through
    `setup`'s handler alone (a line per request is worth the shortcut)."""
    direct = _direct
    if (
        direct is not None
        and logger.isEnabledFor(logging.INFO)
        and not logger.handlers
        and logging.root.handlers == [direct[0]]
    ):
        direct[0].add(direct[1].line(logger.name, msg, fields))
    else:
        logger.info(msg, extra={"fields": fields})


def setup(service: str, level: str = "info") -> None:
    """Route every logger to stdout as JSON lines tagged with `service`.

    Called from a service's `__main__` only: importing this module changes
    nothing, so tests keep pytest's own log capture.
    """
    # No caller's frame, thread or process names: the lines carry none of them
    # (the logging HOWTO's "Optimization"), and each costs time on every line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _direct
    handler = LineHandler(sys.stdout)
    formatter = JsonFormatter(service)
    handler.setFormatter(formatter)
    _direct = (handler, formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates the per-request lines the services write.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
