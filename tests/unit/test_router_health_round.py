"""The router's health round: one model's unexpected failure is its own."""

from __future__ import annotations

import logging

from services.common.metrics import Metrics
from services.common.registry import load_registry
from services.router.core import RouterCore
from services.router.pool import ReplicaPool
from services.router.scenarios import load_scenarios
from tests.harness.procs import ROOT


class Broken(ReplicaPool):
    async def refresh(self, timeout: float) -> None:
        raise RuntimeError("a bug in one model's round")


class Healthy(ReplicaPool):
    rounds = 0

    async def refresh(self, timeout: float) -> None:
        self.rounds += 1
        self.checked.set()


async def test_one_models_exception_does_not_end_the_round_for_the_others(caplog):
    registry = load_registry(ROOT / "models" / "registry.yaml", env={})
    qwen, llama = registry.get("qwen2"), registry.get("llama3")
    pools = {
        "qwen2": Broken("qwen2", qwen.adapters, qwen.limits),
        "llama3": Healthy("llama3", llama.adapters, llama.limits),
    }
    core = RouterCore(registry, load_scenarios(), pools, Metrics("router"))
    with caplog.at_level(logging.ERROR, logger="llmmesh.router"):
        await core.refresh()
        await core.refresh()
    healthy = pools["llama3"]
    assert isinstance(healthy, Healthy) and healthy.rounds == 2 and healthy.checked.is_set()
    failed = [r for r in caplog.records if r.getMessage() == "health round failed for a model"]
    assert [getattr(r, "model", None) for r in failed] == ["qwen2", "qwen2"]
    await core.close()
