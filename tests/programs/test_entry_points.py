"""The programs as they are started: `--help` of each service, `make up`'s
command line, the development CA script, the container health check as a
module, the TGI double as a process, and the CPU backend refusing a missing
model file."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.launcher import certs
from tests.harness.procs import ROOT, free_port, python_module, start, stop, wait_http
from tests.unit.test_launcher_plan import plan

PROGRAMS = ["services.router", "services.adapter", "services.cpu_backend", "services.launcher"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_every_flag_of_every_program_shows_its_variable(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    # One block per option: its line and the help lines indented below it.
    blocks = re.findall(r"^  (-.*(?:\n {4,}\S.*)*)", out, flags=re.MULTILINE)
    options = [" ".join(b.split()) for b in blocks if not b.startswith("-h, --help")]
    assert len(options) >= 9, out
    for option in options:
        variables = r"LLMMESH_[A-Z_]+|TGI_URL|ENGINE_URL|ENGINE_API_KEY_FILE|BACKENDS"
        assert re.search(rf"\[env ({variables})\b", option), option


@pytest.mark.needs("make")
def test_make_up_passes_the_switches_on() -> None:
    dry = subprocess.run(
        ["make", "-n", "up", "API_KEYS_FILE=k.txt", "TLS=1", 'BACKENDS=qwen2=http://h:1'],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    command = " ".join(dry.replace("\\\n", " ").split())
    assert '-m services.launcher --backends "qwen2=http://h:1" --api-keys-file "k.txt" --tls' \
        in command
    plain = subprocess.run(["make", "-n", "up"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=30).stdout
    assert "--tls" not in plain and "--api-keys-file" not in plain


@pytest.mark.needs("make")
def test_make_up_passes_replicas_on() -> None:
    dry = subprocess.run(["make", "-n", "up", "REPLICAS=2"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert '--replicas "2"' in " ".join(dry.replace("\\\n", " ").split())
    plain = subprocess.run(["make", "-n", "up"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=30).stdout
    assert "--replicas" not in plain


def test_dev_certificates_are_made_once_and_reused(tmp_path: Path) -> None:
    p = plan(tmp_path, tls_dir=tmp_path / "tls")
    assert p.tls is not None
    assert certs.ensure(p.tls) is True
    ca = p.tls.ca.read_bytes()
    assert certs.ensure(p.tls) is False
    assert p.tls.ca.read_bytes() == ca
    p.tls.cert("router").unlink()
    assert certs.ensure(p.tls) is True


def test_healthcheck_runs_as_a_module_like_docker_does() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = subprocess.run(
        [sys.executable, "-m", "services.common.healthcheck", address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout
    server.stop(None)


async def test_double_runs_as_a_process_and_can_crash_midstream(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = python_module(
        "tools.tgi_double", "--port", str(port), "--model-id", "proc-model",
        "--max-concurrent-requests", "3", "--token-delay", "0.01",
    )  # fmt: skip
    proc = start(cmd, log_path=tmp_path / "double.log")
    try:
        await asyncio.to_thread(wait_http, url + "/health", 20, proc)
        async with aiohttp.ClientSession() as session:
            info = await (await session.get(url + "/info")).json()
            assert (info["model_id"], info["max_concurrent_requests"]) == ("proc-model", 3)
            # `{}` goes back to the start values given on the command line.
            resp = await session.post(url + "/_control", json={})
            assert (await resp.json())["token_delay"] == 0.01
            resp = await session.post(url + "/_control", json={"mode": "nope"})
            assert resp.status == 400
            state = {"mode": "crash_midstream", "after_tokens": 1}
            assert (await session.post(url + "/_control", json=state)).status == 200
            resp = await session.post(url + "/generate_stream", json={"inputs": "a b c"})
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert await asyncio.to_thread(proc.wait, 10) == 3
    finally:
        stop(proc)


def test_backend_without_a_model_file_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    result = subprocess.run(
        python_module("services.cpu_backend", "--port", "0", "--model-path", str(missing)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"model file not found: {missing}" in result.stderr
