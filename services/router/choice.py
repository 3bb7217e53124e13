"""The choice of replica: which serving replica gets the next request.

Two policies, over what the router knows of each replica: its own requests
in flight there, and the engine load the replica's adapter last reported
(sampled from the engine's /metrics, so it includes requests from other
routers and from clients that reach the engine directly).

`load` (the default) ranks replicas by an estimate of the engine's requests
(queued plus running): the engine's last report, corrected by how many of
the router's own requests started or ended there since that report, and
never below the router's own count. A replica whose KV cache is at least
KV_FULL full ranks after every replica below that mark, since its engine is
about to queue or preempt. A replica that reports nothing (llama.cpp's
server has no /metrics; a report older than the adapter's max age is
dropped) is ranked by the router's own count alone. Ties take turns.

`in-flight` ranks by the router's own count alone: the policy before engine
load was reported, kept for comparison (`make bench`) and as a switch.
`round-robin` ranks every replica alike, so they take turns (the baseline
of vLLM's router, kept for comparison).

`cache-aware` (the router's default, services.router.prefix_choice) sends a
request where its prefix is probably cached and falls back to `load`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from services.common.types import EngineLoad

# The policies ranked here; `cache-aware` builds on `load`.
RANKED = ("load", "in-flight", "round-robin")
CACHE_AWARE = "cache-aware"
POLICIES = (CACHE_AWARE, *RANKED)
# The fraction of the KV cache in use from which a replica ranks last.
KV_FULL = 0.9


class Candidate(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def load(self) -> EngineLoad | None: ...

    @property
    def in_flight_at_report(self) -> int: ...


C = TypeVar("C", bound=Candidate)


def estimated_requests(r: Candidate) -> int:
    """The engine's requests now, as best the router can tell."""
    if r.load is None:
        return r.in_flight
    return max(r.in_flight, r.load.requests + r.in_flight - r.in_flight_at_report)


def load_rank(r: Candidate) -> tuple[bool, int]:
    full = r.load is not None and (r.load.kv_cache_usage or 0.0) >= KV_FULL
    return full, estimated_requests(r)


def in_flight_rank(r: Candidate) -> tuple[bool, int]:
    return False, r.in_flight


def same_rank(r: Candidate) -> tuple[bool, int]:
    return False, 0


RANKS: dict[str, Callable[[Candidate], tuple[bool, int]]] = {
    "load": load_rank,
    "in-flight": in_flight_rank,
    "round-robin": same_rank,
}


def policy_name(value: str) -> str:
    """A policy's name as given (`cache_aware` or `cache-aware`), checked."""
    name = value.strip().lower().replace("_", "-")
    if name not in POLICIES:
        raise ValueError(f"replica choice {value!r} is not one of {', '.join(POLICIES)}")
    return name


def choose(candidates: Sequence[C], policy: str, turn: int) -> C | None:
    """The best-ranked candidate under `policy`; `turn` breaks ties in rotation."""
    if not candidates:
        return None
    rank = RANKS[policy]
    ranks = [rank(r) for r in candidates]
    best = min(ranks)
    tied = [r for r, k in zip(candidates, ranks, strict=True) if k == best]
    return tied[turn % len(tied)]
