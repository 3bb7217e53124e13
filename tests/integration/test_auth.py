"""API keys at the edge: HTTP through Envoy and gRPC, with probes left open."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.fixtures import API_KEY
from tests.harness.mesh import Mesh

pytestmark = pytest.mark.integration
KEY = API_KEY


def http(mesh: Mesh, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"{mesh.http}/v1/generate", method="POST", headers=headers,
        data=json.dumps({"model_id": "qwen2", "inputs": "hi"}).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_needs_a_valid_bearer_key(secured: Mesh) -> None:
    status, body = http(secured, {})
    assert status == 401 and "API key is required" in str(body["message"])
    status, body = http(secured, {"Authorization": "Bearer wrong"})
    assert status == 401 and body["details"][0]["reason"] == "UNAUTHENTICATED"
    status, body = http(secured, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["generated_text"] == "hi"


def test_grpc_needs_a_valid_key(secured: Mesh) -> None:
    for address in (secured.router, secured.envoy):
        stub = pb_grpc.GenerateServiceStub(grpc.insecure_channel(address))
        request = pb.GenerateRequest(model_id="qwen2", inputs="hi")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        reply = stub.Generate(request, timeout=10,
                              metadata=[("authorization", f"Bearer {KEY}")])
        assert reply.generated_text == "hi"


def test_probes_stay_open(secured: Mesh) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(secured.router))
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://127.0.0.1:{secured.metrics}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'reason="unauthenticated"' in metrics
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run([grpcurl, "-plaintext", secured.envoy, "list"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert "llmmesh.v1.GenerateService" in listed.stdout


def test_keys_are_never_logged(secured: Mesh) -> None:
    http(secured, {"Authorization": f"Bearer {KEY}"})
    http(secured, {"Authorization": "Bearer wrong-key-999"})
    for name in ("router", "envoy", "adapter-qwen2"):
        log = secured.log(name)
        assert KEY not in log and "wrong-key-999" not in log, name
