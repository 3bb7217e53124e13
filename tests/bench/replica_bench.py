"""The router's choice of replica, simulated: load-aware against least-in-flight.

    python -m tests.bench.replica_bench [--seconds 1200] [--seeds 5] [--json out.json]

A discrete-event simulation in virtual time (deterministic, no sleeping),
using the router's own policy code (services.router.choice). Three replicas
of one model: two at full speed and one at 60 %, each an engine that runs at
most 4 requests at once and queues the rest. The router sends Poisson
traffic; other traffic (another router, or clients that reach the engine
directly) goes to the first replica only, so the router cannot see it in its
own counts. Each adapter samples its engine's queue and batch every 0.5 s;
the router reads the samples once a second, as its health rounds do.

Both policies see the same arrivals and the same work per request; the
figures are the router's requests' latency (arrival to last token), p50 and
p95, pooled over every seed.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.types import EngineLoad
from services.router.choice import POLICIES, choose
from tools.loadtest.stats import nearest_rank

SPEEDS = (1.0, 1.0, 0.6)
SLOTS = 4
MEAN_WORK = 2.0  # seconds of generation per request at full speed
ROUTER_RATE = 2.6  # requests/s through the router
OUTSIDE_RATE = 1.6  # requests/s straight to the first replica
SAMPLE_EVERY = 0.5  # the adapter's --load-interval
POLL_EVERY = 1.0  # the router's --health-interval


@dataclass(eq=False)
class SimReplica:
    speed: float
    running: int = 0
    queue: deque[tuple[float, bool, float]] = field(default_factory=deque)  # arrived, ours, work
    # What the router knows (the Candidate protocol of services.router.choice).
    in_flight: int = 0
    load: EngineLoad | None = None
    in_flight_at_report: int = 0
    sampled: EngineLoad | None = None  # the adapter's latest sample


def simulate(policy: str, seed: int, seconds: float, *, reports: bool = True) -> list[float]:
    """Latencies of the router's requests under `policy`. Without `reports`,
    the engines report no load (the fallback: the router's own counts)."""
    rng = random.Random(seed)
    replicas = [SimReplica(s) for s in SPEEDS]
    events: list[tuple[float, int, str, Any]] = []
    serial = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal serial
        serial += 1
        heapq.heappush(events, (t, serial, kind, data))

    # The same arrivals and work for every policy: drawn up front from the seed.
    t = 0.0
    while t < seconds:
        t += rng.expovariate(ROUTER_RATE)
        push(t, "router", rng.expovariate(1 / MEAN_WORK))
    t = 0.0
    while t < seconds:
        t += rng.expovariate(OUTSIDE_RATE)
        push(t, "outside", rng.expovariate(1 / MEAN_WORK))
    push(0.0, "sample")
    push(0.0, "poll")
    latencies: list[float] = []
    turn = 0

    def admit(now: float, r: SimReplica, work: float, arrived: float, ours: bool) -> None:
        if r.running < SLOTS:
            r.running += 1
            push(now + work / r.speed, "done", (r, arrived, ours))
        else:
            r.queue.append((arrived, ours, work))

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "router":
            choice = choose(replicas, policy, turn)
            turn += 1
            assert choice is not None
            choice.in_flight += 1
            admit(now, choice, data, now, True)
        elif kind == "outside":
            admit(now, replicas[0], data, now, False)
        elif kind == "done":
            r, arrived, ours = data
            r.running -= 1
            if ours:
                r.in_flight -= 1
                latencies.append(now - arrived)
            if r.queue:
                queued_at, queued_ours, work = r.queue.popleft()
                r.running += 1
                push(now + work / r.speed, "done", (r, queued_at, queued_ours))
        elif kind == "sample":
            for r in replicas:
                r.sampled = EngineLoad(waiting=len(r.queue), running=r.running,
                                       kv_cache_usage=r.running / SLOTS * 0.5)
            if now < seconds:
                push(now + SAMPLE_EVERY, "sample")
        elif kind == "poll":
            for r in replicas:
                r.load = r.sampled if reports else None
                r.in_flight_at_report = r.in_flight
            if now < seconds:
                push(now + POLL_EVERY, "poll")
    return latencies


def run(seconds: float, seeds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    cases = [(p, True) for p in POLICIES] + [("load", False)]
    for policy, reports in cases:
        latencies: list[float] = []
        for seed in range(seeds):
            latencies += simulate(policy, seed, seconds, reports=reports)
        name = policy if reports else "load, engines report nothing"
        out[name] = {
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(nearest_rank(latencies, 95), 2),
            "requests": len(latencies),
        }
    return out


def main() -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m tests.bench.replica_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1200.0, help="virtual seconds per run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args, _ = p.parse_known_args()
    results = run(args.seconds, args.seeds)
    print(f"replica choice, simulated: speeds {SPEEDS}, {SLOTS} slots each, "
          f"{ROUTER_RATE} req/s via the router + {OUTSIDE_RATE} req/s straight to replica 1, "
          f"{args.seconds:.0f} s x {args.seeds} seeds")
    print(f"{'policy':<32} {'p50 s':>7} {'p95 s':>7} {'requests':>9}")
    for name, r in results.items():
        print(f"{name:<32} {r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {r['requests']:>9}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
