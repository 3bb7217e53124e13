"""Whether each model has a replica that serves, as the mesh's router sees it,
said in `make up`'s own output: when a model loses its last serving replica
(which model, and since when) and when it serves again (and after how long).

A single dead replica is not news here (the supervisor says it restarts the
process); a model that nothing serves is, since every request for it fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Outage:
    model: str
    since: float  # wall-clock time, seconds since the epoch
    since_monotonic: float


def hhmmss(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + " UTC"


class ModelWatch:
    """Polls `probe` (model -> serving, or None when the router cannot be asked)
    every `interval` seconds of `clock` and logs each model's transitions."""

    def __init__(
        self,
        models: Sequence[str],
        probe: Callable[[], Mapping[str, bool] | None],
        log: Callable[[str], None],
        *,
        detail: Callable[[str], str] = lambda model: "",
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.models = tuple(models)
        self._probe = probe
        self._log = log
        self._detail = detail
        self._interval = interval
        self._clock = clock
        self._wall = wall
        self._next = 0.0
        self.down: dict[str, Outage] = {}

    def tick(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._interval
        states = self._probe()
        if states is None:  # the router itself does not answer: its death is said apart
            return
        for model in self.models:
            serving = states.get(model)
            if serving is None:
                continue
            outage = self.down.get(model)
            if not serving and outage is None:
                outage = Outage(model, self._wall(), now)
                self.down[model] = outage
                detail = self._detail(model)
                self._log(
                    f"MODEL DOWN: {model} has no serving replica since {hhmmss(outage.since)}; "
                    f"every request for it fails until one serves again"
                    + (f" ({detail})" if detail else "")
                )
            elif serving and outage is not None:
                del self.down[model]
                self._log(
                    f"model {model} serves again at {hhmmss(self._wall())}, after "
                    f"{now - outage.since_monotonic:.1f} s without a serving replica "
                    f"(down since {hhmmss(outage.since)})"
                )
