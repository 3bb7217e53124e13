"""The router's replica-choice policies as its pools apply them: the
cache-aware choice wired in, round robin, the flag, the environment and the
registry's per-model override, and the choice's counters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.types import EngineLoad, GenerationRequest, Limits, Message
from services.router import prefix_metrics
from services.router.__main__ import parse_args
from services.router.choice import POLICIES, policy_name
from services.router.pool import ReplicaPool

SYSTEM = " ".join(f"clause {i} of the policy text" for i in range(200))


@dataclass(eq=False)
class R:
    address: str
    serving: bool = True
    in_flight: int = 0
    load: EngineLoad | None = None
    in_flight_at_report: int = 0


def pool(policy: str, n: int = 2) -> ReplicaPool:
    p = ReplicaPool("m", (), Limits(), policy=policy)
    for i in range(n):
        p.replicas[f"10.0.0.{i}:50061"] = R(f"10.0.0.{i}:50061")  # type: ignore[assignment]
    return p


def turn(system: str, n: int) -> GenerationRequest:
    messages = [Message("system", system)]
    for i in range(n):
        messages += [Message("user", f"question {i}"), Message("assistant", f"answer {i}")]
    return GenerationRequest("m", messages=(*messages, Message("user", "next")))


def test_policy_names_take_either_spelling_and_refuse_others():
    assert policy_name("cache_aware") == "cache-aware"
    assert policy_name("Round_Robin") == "round-robin"
    assert set(POLICIES) == {"cache-aware", "load", "in-flight", "round-robin"}
    with pytest.raises(ValueError, match="random"):
        policy_name("random")


def test_cache_aware_pool_sends_each_conversation_back_to_its_replica():
    p = pool("cache-aware", 3)
    homes = {}
    for c in range(6):
        system = f"company {c}. " + SYSTEM
        first = p.pick(set(), turn(system, 0))
        assert first is not None
        homes[c] = first
    for t in range(1, 4):
        for c in range(6):
            replica = p.pick(set(), turn(f"company {c}. " + SYSTEM, t))
            assert replica is homes[c]
    assert p.prefix is not None
    assert p.prefix.stats.requests == 24 and p.prefix.stats.hits == 18
    # The load policy the pool held before spreads the same turns blindly.
    assert len(set(map(id, homes.values()))) > 1


def test_a_replica_that_stops_serving_loses_its_index():
    p = pool("cache-aware")
    request = turn(SYSTEM, 0)
    home = p.pick(set(), request)
    assert home is not None and p.prefix is not None
    assert home.address in p.prefix.indexes
    p.mark_down(home)  # type: ignore[arg-type]
    assert home.address not in p.prefix.indexes
    other = p.pick(set(), request)
    assert other is not None and other is not home


def test_failover_excludes_the_tried_replica_even_when_it_holds_the_prefix():
    p = pool("cache-aware")
    home = p.pick(set(), turn(SYSTEM, 0))
    assert home is not None
    again = p.pick({home}, turn(SYSTEM, 1))  # type: ignore[arg-type]
    assert again is not None and again is not home


def test_round_robin_takes_turns_whatever_the_load():
    p = pool("round-robin")
    a, b = p.replicas.values()
    a.load = EngineLoad(waiting=20, running=4)
    picks = [p.pick(set(), turn(SYSTEM, 0)) for _ in range(4)]
    assert picks.count(a) == 2 and picks.count(b) == 2
    assert p.prefix is None


def test_load_pool_ignores_prefixes():
    p = pool("load")
    a, b = p.replicas.values()
    b.load = EngineLoad(running=1)
    assert all(p.pick(set(), turn(SYSTEM, t)) is a for t in range(3))


def test_prefix_counters_at_scrape_time():
    p = pool("cache-aware")
    for t in range(3):
        p.pick(set(), turn(SYSTEM, t))
    registry = CollectorRegistry()
    prefix_metrics.register(registry, {"m": p, "other": pool("load")}, "router")
    text = generate_latest(registry).decode()
    assert 'llmmesh_router_prefix_requests_total{model="m",service="router"} 3.0' in text
    assert 'llmmesh_router_prefix_hits_total{model="m",service="router"} 2.0' in text
    assert 'model="other"' not in text  # a model routed by load has no such series


def _registry(tmp_path: Path, choice: str = "") -> Path:
    extra = f"\n    replica_choice: {choice}" if choice else ""
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n  - id: m\n    name: M\n    adapters: [127.0.0.1:1]{extra}\n")
    return path


def test_the_flag_defaults_to_cache_aware_and_reads_the_environment(tmp_path, monkeypatch):
    registry = str(_registry(tmp_path))
    monkeypatch.delenv("LLMMESH_REPLICA_CHOICE", raising=False)
    assert parse_args(["--registry", registry]).replica_choice == "cache-aware"
    assert (
        parse_args(["--registry", registry, "--replica-choice", "round_robin"]).replica_choice
        == "round-robin"
    )
    monkeypatch.setenv("LLMMESH_REPLICA_CHOICE", "load")
    assert parse_args(["--registry", registry]).replica_choice == "load"
    with pytest.raises(SystemExit):
        parse_args(["--registry", registry, "--replica-choice", "fastest"])


def test_a_models_registry_entry_overrides_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMMESH_REPLICA_CHOICE", raising=False)
    settings = parse_args(["--registry", str(_registry(tmp_path, "round_robin"))])
    assert settings.registry.models[0].replica_choice == "round_robin"
    with pytest.raises(SystemExit):
        parse_args(["--registry", str(_registry(tmp_path, "fastest"))])
