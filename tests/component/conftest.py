"""Real grpc.aio servers on port 0: adapters over in-process backends, and
the router in front of them, talking over real channels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from services.adapter.chat_template import ChatTemplate
from services.adapter.core import AdapterCore
from services.common.grpc_server import RunningServer, ServerSettings, start_server
from services.common.health import HealthBoard
from services.common.metrics import Metrics
from services.common.registry import Registry, load_registry
from services.common.servicer import SERVICE_NAME
from services.router.core import RouterCore
from services.router.pool import ReplicaPool
from services.router.scenarios import load_scenarios
from tests.fakes.backend import FakeBackend

ROOT = Path(__file__).parents[2]


@dataclass
class Adapter:
    core: AdapterCore
    backend: FakeBackend
    server: RunningServer
    metrics: Metrics

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def refresh(self) -> None:
        serving = await self.core.refresh()
        for name in ("", SERVICE_NAME, self.core.spec.id):
            await self.server.health.set(name, serving)


@dataclass
class Router:
    core: RouterCore
    server: RunningServer
    metrics: Metrics
    channel: grpc.aio.Channel

    @property
    def stub(self) -> pb_grpc.GenerateServiceStub:
        return pb_grpc.GenerateServiceStub(self.channel)


def registry_for(tmp_path: Path, addresses: dict[str, list[str]]) -> Registry:
    env = {
        "QWEN2_ADAPTERS": ",".join(addresses.get("qwen2", ["127.0.0.1:1"])),
        "LLAMA3_ADAPTERS": ",".join(addresses.get("llama3", ["127.0.0.1:1"])),
    }
    return load_registry(ROOT / "models" / "registry.yaml", env=env)


@pytest.fixture
async def start_adapter() -> AsyncIterator[Callable[..., object]]:
    started: list[Adapter] = []
    registry = load_registry(ROOT / "models" / "registry.yaml", env={})

    async def start(model: str = "qwen2", backend: FakeBackend | None = None, **kw) -> Adapter:
        spec = registry.get(model)
        backend = backend or FakeBackend()
        metrics = Metrics(f"adapter-{model}")
        assert spec.chat_template is not None
        core = AdapterCore(spec, backend, ChatTemplate.load(spec.chat_template), metrics, **kw)
        server = await start_server(core, metrics, HealthBoard(), ServerSettings(port=0))
        adapter = Adapter(core, backend, server, metrics)
        await adapter.refresh()
        started.append(adapter)
        return adapter

    yield start
    for adapter in started:
        await adapter.server.stop(0)


@pytest.fixture
async def start_router(tmp_path) -> AsyncIterator[Callable[..., object]]:
    started: list[Router] = []

    async def start(addresses: dict[str, list[str]], max_in_flight: int = 512) -> Router:
        registry = registry_for(tmp_path, addresses)
        pools = {m.id: ReplicaPool(m.id, m.adapters, m.limits) for m in registry.models}
        metrics = Metrics("router")
        core = RouterCore(registry, load_scenarios(), pools, metrics, default_timeout=30,
                          max_in_flight=max_in_flight)
        await core.refresh()
        server = await start_server(core, metrics, HealthBoard(), ServerSettings(port=0))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        router = Router(core, server, metrics, channel)
        started.append(router)
        return router

    yield start
    for router in started:
        await router.channel.close()
        await router.server.stop(0)
        await router.core.close()
