"""The mesh fixtures, started once per test session and shared by every
module that asks for them (tests/integration/conftest.py offers them):

  mesh     the launched mesh in front of two TGI doubles, no API keys
  secured  the same with API keys on (API_KEY) and two requests per model
           admitted at once
  traced   one model's mesh assembled part by part (TGI double, adapter,
           router, Envoy), each exporting its spans to an in-test OTLP
           receiver, the gRPC and HTTP exporters both in use
  clean    the mesh a test asked for (`mesh`, or a module's own override of
           it), with both doubles back to their start state and every model
           ready, before the test and after it

A test that changes a double's behaviour uses `clean`; one that changes
anything else in a running process (a flag, a restart) starts its own mesh.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from scripts.otlp_receiver import OtlpReceiver
from tests.harness.mesh import Mesh, reset, running_mesh
from tests.harness.parts import (
    ROOT,
    AdapterPart,
    DoublePart,
    EnvoyPart,
    RouterPart,
    start_all,
    stop_all,
)

API_KEY = "sk-llmmesh-test-key-4242"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("mesh")) as started:
        yield started


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("secured"), "--max-concurrent-requests", "2",
                      api_key=API_KEY) as started:
        yield started


@pytest.fixture
def clean(mesh: Mesh) -> Iterator[Mesh]:
    reset(mesh)
    yield mesh
    for double in mesh.doubles.values():
        double.reset()


@dataclass
class Traced:
    """One model's mesh, part by part, every part exporting its spans to `receiver`."""

    receiver: OtlpReceiver
    double: DoublePart
    adapter: AdapterPart
    router: RouterPart
    envoy: EnvoyPart


def otel_env(receiver: OtlpReceiver, protocol: str) -> dict[str, str]:
    """The OTEL_* variables that send a process's spans to `receiver`."""
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="session")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("tracing")
    receiver = OtlpReceiver()
    receiver.start()
    double = DoublePart("qwen2", tmp, "--log-level", "INFO")
    double.env = otel_env(receiver, "grpc")
    adapter = AdapterPart("adapter-qwen2", tmp, "qwen2", double)
    adapter.env = otel_env(receiver, "http/protobuf")
    router = RouterPart(tmp, {"qwen2": [adapter.address]})
    router.env.update(otel_env(receiver, "grpc"))
    envoy = EnvoyPart(tmp, router.port)
    sys.path.insert(0, str(ROOT / "envoy"))
    import render  # envoy/render.py

    (tmp / "envoy.yaml").write_text(render.render(
        otel=otel_env(receiver, "http/protobuf"),
        LISTEN_PORT=envoy.port, ADMIN_PORT=envoy.admin, ROUTER_PORT=router.port,
        DESCRIPTOR=ROOT / "gen" / "llmmesh.binpb"))
    parts = [double, adapter, router, envoy]
    try:
        start_all(parts)
        yield Traced(receiver, double, adapter, router, envoy)
    finally:
        stop_all(parts)
        receiver.stop()
