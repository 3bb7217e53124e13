"""The container health check against a real gRPC health server and a real HTTP
server on port 0."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import healthcheck

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def grpc_health() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_grpc_serving_is_healthy(grpc_health: tuple[str, health.HealthServicer]) -> None:
    address, servicer = grpc_health
    servicer.set("", SERVING)
    assert healthcheck.main([address]) == healthcheck.HEALTHY


def test_grpc_not_serving_is_unhealthy(grpc_health: tuple[str, health.HealthServicer]) -> None:
    address, servicer = grpc_health
    servicer.set("qwen2", NOT_SERVING)
    assert healthcheck.main([address, "--service", "qwen2"]) == healthcheck.UNHEALTHY


def test_grpc_unknown_service_is_unhealthy(
    grpc_health: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = grpc_health
    assert healthcheck.main([address, "--service", "nope"]) == healthcheck.UNHEALTHY
    assert "NOT_FOUND" in capsys.readouterr().out


def test_nothing_listening_is_unhealthy() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    assert healthcheck.main([address, "--timeout", "1"]) == healthcheck.UNHEALTHY


def test_default_target_comes_from_llmmesh_port(
    grpc_health: tuple[str, health.HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, servicer = grpc_health
    servicer.set("", SERVING)
    monkeypatch.setenv("LLMMESH_PORT", address.rsplit(":", 1)[1])
    assert healthcheck.main([]) == healthcheck.HEALTHY
    monkeypatch.delenv("LLMMESH_PORT")
    assert healthcheck.main([]) == healthcheck.USAGE


def test_http_2xx_is_healthy_and_others_are_not(http_base: str) -> None:
    assert healthcheck.main([f"{http_base}/health"]) == healthcheck.HEALTHY
    assert healthcheck.main([f"{http_base}/other"]) == healthcheck.UNHEALTHY
    closed = f"http://127.0.0.1:{_closed_port()}/health"
    assert healthcheck.main([closed, "--timeout", "1"]) == healthcheck.UNHEALTHY


