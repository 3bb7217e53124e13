"""TLS at the edge and mutual TLS between Envoy, the router and an adapter,
with certificates from scripts/dev_ca.sh."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http

pytestmark = pytest.mark.integration
sys.path.insert(0, str(ROOT / "envoy"))
import render  # noqa: E402  (envoy/render.py)


@dataclass
class SecureMesh:
    certs: Path
    https: str
    envoy: str
    router: str
    adapter: str
    openai: str  # the router's OpenAI listener

    def pem(self, name: str) -> bytes:
        return (self.certs / name).read_bytes()

    def credentials(self, with_client_cert: bool) -> grpc.ChannelCredentials:
        if not with_client_cert:
            return grpc.ssl_channel_credentials(root_certificates=self.pem("ca.pem"))
        return grpc.ssl_channel_credentials(
            root_certificates=self.pem("ca.pem"), private_key=self.pem("client-key.pem"),
            certificate_chain=self.pem("client.pem"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    tmp = tmp_path_factory.mktemp("tls")
    certs = tmp / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "dev_ca.sh"), str(certs)], check=True,
                   capture_output=True, timeout=60)
    ports = {n: free_port() for n in ("double", "adapter", "router", "openai", "envoy", "admin")}

    def tls_flags(name: str) -> list[str]:
        return ["--tls-cert", str(certs / f"{name}.pem"),
                "--tls-key", str(certs / f"{name}-key.pem"), "--tls-ca", str(certs / "ca.pem")]

    procs = []
    try:
        double = start(python_module("tools.tgi_double", "--port", str(ports["double"])),
                       log_path=tmp / "double.log")
        procs.append(double)
        wait_http(f"http://127.0.0.1:{ports['double']}/health", 30, double)
        procs.append(start(python_module(
            "services.adapter", "--model", "qwen2", "--port", str(ports["adapter"]),
            "--tgi-url", f"http://127.0.0.1:{ports['double']}", *tls_flags("adapter")),
            log_path=tmp / "adapter.log"))
        procs.append(start(python_module(
            "services.router", "--port", str(ports["router"]),
            "--openai-port", str(ports["openai"]), *tls_flags("router")),
            env={"QWEN2_ADAPTERS": f"127.0.0.1:{ports['adapter']}"},
            log_path=tmp / "router.log"))
        config = tmp / "envoy.yaml"
        config.write_text(render.with_tls(
            render.render(LISTEN_PORT=ports["envoy"], ADMIN_PORT=ports["admin"],
                          ROUTER_PORT=ports["router"], OPENAI_PORT=ports["openai"],
                          DESCRIPTOR=ROOT / "gen" / "llmmesh.binpb"),
            cert=str(certs / "envoy.pem"), key=str(certs / "envoy-key.pem"),
            ca=str(certs / "ca.pem")))
        procs.append(start([str(Path(sys.executable).parent / "envoy"), "-c", str(config),
                            "--disable-hot-restart", "--log-level", "warn"],
                           log_path=tmp / "envoy.log"))
        mesh = SecureMesh(certs, f"https://localhost:{ports['envoy']}",
                          f"localhost:{ports['envoy']}", f"localhost:{ports['router']}",
                          f"localhost:{ports['adapter']}", f"localhost:{ports['openai']}")
        _wait_ready(mesh)
        yield mesh
    finally:
        for proc in reversed(procs):
            stop(proc)


def _context(mesh: SecureMesh) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(mesh.certs / "ca.pem"))


def _wait_ready(mesh: SecureMesh) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{mesh.https}/v1/mesh/models", timeout=2,
                                        context=_context(mesh)) as resp:
                if json.loads(resp.read())["models"][0]["ready"]:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the TLS mesh did not become ready")


def test_https_at_the_edge(secure: SecureMesh) -> None:
    request = urllib.request.Request(
        f"{secure.https}/v1/generate", method="POST",
        data=json.dumps({"model_id": "qwen2", "inputs": "over TLS"}).encode())
    with urllib.request.urlopen(request, timeout=10, context=_context(secure)) as resp:
        assert json.loads(resp.read())["generated_text"] == "over TLS"


def test_grpc_over_tls_at_the_edge_needs_no_client_cert(secure: SecureMesh) -> None:
    channel = grpc.secure_channel(secure.envoy, secure.credentials(with_client_cert=False))
    reply = pb_grpc.GenerateServiceStub(channel).Generate(
        pb.GenerateRequest(model_id="qwen2", inputs="hello"), timeout=10)
    assert reply.generated_text == "hello"


@pytest.mark.parametrize("target", ["router", "adapter"])
def test_inner_services_refuse_clients_without_a_certificate(
    secure: SecureMesh, target: str
) -> None:
    address = getattr(secure, target)
    health = health_pb2.HealthCheckRequest()
    without = grpc.secure_channel(address, secure.credentials(with_client_cert=False))
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(without).Check(health, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    plaintext = grpc.insecure_channel(address)
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(plaintext).Check(health, timeout=5)
    with_cert = grpc.secure_channel(address, secure.credentials(with_client_cert=True))
    reply = health_pb2_grpc.HealthStub(with_cert).Check(health, timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_router_reaches_adapter_over_mutual_tls(secure: SecureMesh) -> None:
    channel = grpc.secure_channel(secure.router, secure.credentials(with_client_cert=True))
    reply = pb_grpc.GenerateServiceStub(channel).Generate(
        pb.GenerateRequest(model_id="qwen2", inputs="mutual"), timeout=10)
    assert reply.generated_text == "mutual" and reply.model == "Qwen2-7B-Instruct-GPTQ-Int4"


@pytest.mark.parametrize("flags", [["-cacert"], ["-plaintext"]], ids=["no-cert", "plaintext"])
def test_grpcurl_without_a_certificate_fails_to_dial(secure: SecureMesh, flags: list[str]) -> None:
    # What docs/security.md says such a client sees: the server
    # closes the connection, so no RPC status, only a failed dial.
    args = [*flags, str(secure.certs / "ca.pem")] if flags == ["-cacert"] else flags
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    run = subprocess.run([grpcurl, *args, "-connect-timeout", "3", secure.router, "list"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 1
    assert f'Failed to dial target host "{secure.router}"' in run.stderr
    assert re.search(r"broken pipe|use of closed network connection|context deadline exceeded",
                     run.stderr), run.stderr


def test_openai_api_over_tls_and_mutual_tls_behind(secure: SecureMesh) -> None:
    import openai

    ca = _context(secure)
    client = openai.OpenAI(base_url=f"{secure.https}/v1", api_key="x", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=ca, timeout=10))
    reply = client.chat.completions.create(
        model="qwen2", messages=[{"role": "user", "content": "private words"}])
    assert reply.choices[0].message.content == "private words"
    # The router's OpenAI listener itself takes only clients with a certificate.
    with pytest.raises((ssl.SSLError, OSError)):
        urllib.request.urlopen(f"https://{secure.openai}/health", timeout=5, context=ca)
    with_cert = _context(secure)
    with_cert.load_cert_chain(secure.certs / "client.pem", secure.certs / "client-key.pem")
    with urllib.request.urlopen(f"https://{secure.openai}/health", timeout=5,
                                context=with_cert) as resp:
        assert resp.status == 200
