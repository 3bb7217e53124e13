"""When to send: the steps of a sweep and the gaps between arrivals.

At a request rate R, gaps between arrivals are drawn from a gamma
distribution with shape k (the burstiness) and mean 1/R, as vLLM's serving
benchmark does: k = 1 is a Poisson process, k < 1 burstier (arrivals in
clumps, with long quiet gaps), k > 1 more regular. R = inf sends every
request at once. At a fixed concurrency C, C clients each send their next
request as soon as their last one ends (a closed loop).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One step of a sweep: a request rate (req/s) or a number of concurrent clients."""

    mode: str  # "rate" or "concurrency"
    value: float

    @property
    def json_value(self) -> float | str:
        """The value as JSON can hold it ("inf" for an unbounded rate)."""
        return "inf" if math.isinf(self.value) else self.value

    @property
    def label(self) -> str:
        if self.mode == "rate":
            return "rate inf" if math.isinf(self.value) else f"rate {self.value:g}/s"
        return f"concurrency {self.value:g}"


def parse_steps(mode: str, text: str) -> list[Step]:
    """`1,2,4` (or `inf` for a rate) as steps of one mode."""
    steps = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{mode}: {part!r} is not a number") from None
        if math.isnan(value) or value <= 0:
            raise ValueError(f"{mode}: {part!r} must be > 0")
        if mode == "concurrency" and (math.isinf(value) or value != int(value)):
            raise ValueError(f"concurrency: {part!r} must be a whole number")
        steps.append(Step(mode, value))
    if not steps:
        raise ValueError(f"{mode}: no values")
    return steps


def gaps(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds between one arrival and the next, forever."""
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)  # mean = shape * scale = 1 / rate
    while True:
        yield rng.gammavariate(burstiness, scale)
