"""Tenants through Envoy with real processes: two routers sharing one real
redis-server keep one token budget; each refusal in the native and the
OpenAI shape."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.parts import AdapterPart, DoublePart, EnvoyPart, Part, RouterPart, stop_all
from tests.harness.procs import free_port, start, stop, wait_http

pytestmark = pytest.mark.integration

TOKENS_PER_MINUTE = 1500
REPLY = " ".join(f"w{i}" for i in range(12))  # 12 tokens, then EOS

TENANTS = f"""\
tenants:
  - name: metered
    keys: [sk-metered]
    models: [qwen2]
    limits: {{tokens_per_minute: {TOKENS_PER_MINUTE}}}
  - name: reader
    keys: [sk-reader]
    models: [llama3]
  - name: nightly
    keys: [sk-nightly]
    priority: batch
  - name: ops
    keys: [sk-ops]
    admin: true
"""


@dataclass
class TwoRouters:
    envoys: list[EnvoyPart]
    routers: list[RouterPart]
    metrics: list[int]
    parts: list[Part]


def _redis(port: int) -> Any:
    proc = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no"])
    deadline = time.monotonic() + 10
    import socket
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRouters]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis)")
    tmp = tmp_path_factory.mktemp("tenants")
    redis_port = free_port()
    redis = _redis(redis_port)
    tenants = tmp / "tenants.yaml"
    tenants.write_text(TENANTS)
    double = DoublePart("qwen2", tmp, "--token-delay", "0.01", "--reply", REPLY)
    parts: list[Part] = [double]
    try:
        double.start()
        adapter = AdapterPart("adapter", tmp, "qwen2", double)
        adapter.start()
        parts.append(adapter)
        routers, envoys, metrics = [], [], []
        for i in range(2):
            where = tmp / f"r{i}"
            where.mkdir()
            metrics_port = free_port()
            router = RouterPart(
                where, {"qwen2": [adapter.address]},
                "--tenants-file", str(tenants),
                "--quota-store", f"redis://127.0.0.1:{redis_port}",
                "--metrics-port", str(metrics_port),
            )
            router.start()
            parts.append(router)
            envoy = EnvoyPart(where, router.port)
            envoy.spawn()
            parts.append(envoy)
            # Every call needs a key: ready once the router's 401 comes through.
            wait_http(f"{envoy.http}/v1/mesh/models", 30, envoy.proc, expect=401)
            routers.append(router)
            envoys.append(envoy)
            metrics.append(metrics_port)
        yield TwoRouters(envoys, routers, metrics, parts)
    finally:
        stop_all(parts[::-1])
        stop(redis)


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _stream(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    """One native streaming request: its status and its last event (or error body)."""
    body = {"model_id": "qwen2", "inputs": "count to twelve",
            "parameters": {"max_new_tokens": 16}}
    async with session.post(f"{url}/v1/generate_stream", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            return {"status": resp.status, "body": await resp.json()}
        last: dict[str, Any] = {}
        async for line in resp.content:
            if line.startswith(b"data:"):
                last = json.loads(line[5:])
        return {"status": 200, "last": last}


def test_two_routers_keep_one_token_budget(mesh: TwoRouters) -> None:
    """64 concurrent streams through both Envoys: the tokens served stay
    within the tenant's per-minute limit, the rest is refused with
    QUOTA_EXCEEDED and a RetryInfo, and any overshoot is reported."""

    async def flood() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(
                _stream(session, mesh.envoys[i % 2].http, "sk-metered") for i in range(64)
            ))

    results = asyncio.run(flood())
    served = [r["last"] for r in results if r["status"] == 200]
    refused = [r["body"] for r in results if r["status"] != 200]
    assert served and refused, [r["status"] for r in results]
    assert all(r["finish_reason"] != "FINISH_REASON_ERROR" for r in served), served
    used = sum(int(r["input_tokens"]) + int(r["tokens"]) for r in served)
    assert used <= TOKENS_PER_MINUTE, used
    for body in refused:
        assert body["code"] == 8, body  # RESOURCE_EXHAUSTED
        reasons = {d.get("reason") for d in body["details"]}
        assert "QUOTA_EXCEEDED" in reasons, body
        assert any(d["@type"].endswith("RetryInfo") for d in body["details"]), body
    # Both routers took part: the budget is one, not one per router.
    admitted = [_metric(p, "llmmesh_tenant_requests_total", tenant="metered")
                for p in mesh.metrics]
    refusals = [_metric(p, "llmmesh_tenant_refused_total", tenant="metered",
                        reason="quota_exceeded") for p in mesh.metrics]
    assert sum(admitted) == len(served) and sum(refusals) == len(refused)
    assert all(a + r == 32 for a, r in zip(admitted, refusals, strict=True))
    overshoot = sum(_metric(p, "llmmesh_tenant_overshoot_tokens_total", tenant="metered")
                    for p in mesh.metrics)
    # The reservation counts at least the real input (the double tokenizes on
    # whitespace), so nothing overshoots; the counter exists and says so.
    assert overshoot == 0
    counted = sum(_metric(p, "llmmesh_tenant_output_tokens_total", tenant="metered")
                  + _metric(p, "llmmesh_tenant_input_tokens_total", tenant="metered")
                  for p in mesh.metrics)
    assert counted == used


def _native(mesh: TwoRouters, path: str, key: str | None, body: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{mesh.envoys[0].http}{path}", data=json.dumps(body).encode() if body else None,
        headers=h, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _reason(body: dict[str, Any]) -> str:
    return next((d["reason"] for d in body.get("details", ())
                 if d["@type"].endswith("ErrorInfo")), repr(body))


GENERATE = {"model_id": "qwen2", "inputs": "hello", "parameters": {"max_new_tokens": 4}}


def test_refusals_in_the_native_shape(mesh: TwoRouters) -> None:
    status, body = _native(mesh, "/v1/generate", None, GENERATE)
    assert (status, _reason(body)) == (401, "UNAUTHENTICATED")
    status, body = _native(mesh, "/v1/generate", "sk-nobody", GENERATE)
    assert (status, _reason(body)) == (401, "UNAUTHENTICATED")
    status, body = _native(mesh, "/v1/generate", "sk-reader", GENERATE)
    assert (status, _reason(body)) == (403, "MODEL_NOT_ALLOWED")
    assert "qwen2" in body["message"]
    status, body = _native(mesh, "/v1/generate", "sk-nightly", GENERATE,
                           {"x-llmmesh-priority": "interactive"})
    assert (status, _reason(body)) == (400, "INVALID_ARGUMENT")
    assert "x-llmmesh-priority" in body["message"]
    status, body = _native(mesh, "/v1/generate", "sk-nightly", GENERATE,
                           {"x-llmmesh-priority": "urgent"})
    assert status == 400 and "x-llmmesh-priority" in body["message"]
    status, body = _native(mesh, "/v1/generate", "sk-nightly", GENERATE)
    assert status == 200 and body["tokens"] > 0, body
    # Usage: an admin key only, and no key material in it.
    status, body = _native(mesh, "/v1/mesh/usage", "sk-nightly")
    assert (status, _reason(body)) == (403, "ADMIN_ONLY")
    status, body = _native(mesh, "/v1/mesh/usage", "sk-ops")
    assert status == 200
    names = [t["tenant"] for t in body["tenants"]]
    assert names == ["metered", "reader", "nightly", "ops"]
    assert "sk-" not in json.dumps(body)


def test_over_budget_in_the_native_shape(mesh: TwoRouters) -> None:
    """A request larger than the limit itself can never fit, and says so."""
    huge = {"model_id": "qwen2", "inputs": "x " * 800,
            "parameters": {"max_new_tokens": 1000}}
    status, body = _native(mesh, "/v1/generate", "sk-metered", huge)
    assert (status, _reason(body)) == (429, "QUOTA_NEVER_FITS"), body


@pytest.fixture(scope="module")
def openai_face(tmp_path_factory: pytest.TempPathFactory, mesh: TwoRouters) -> Iterator[str]:
    """The first router's setup with an OpenAI listener of its own, behind a
    real Envoy (OpenAI's headers must survive the proxy)."""
    tmp = tmp_path_factory.mktemp("tenants-openai")
    tenants = tmp / "tenants.yaml"
    tenants.write_text(TENANTS.replace(
        f"tokens_per_minute: {TOKENS_PER_MINUTE}", "tokens_per_minute: 400"))
    adapter = mesh.parts[1]
    assert isinstance(adapter, AdapterPart)
    port = free_port()
    router = RouterPart(tmp, {"qwen2": [adapter.address]}, "--tenants-file", str(tenants),
                        "--openai-port", str(port))
    router.start()
    wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    envoy = EnvoyPart(tmp, router.port, openai_port=port)
    envoy.spawn()
    wait_http(f"{envoy.http}/v1/mesh/models", 30, envoy.proc, expect=401)
    yield envoy.http
    envoy.stop()
    router.stop()


def _openai(url: str, key: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any],
                                                                   dict[str, str]]:
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers=h)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


CHAT = {"model": "qwen2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_refusals_in_the_openai_shape(openai_face: str) -> None:
    status, body, _ = _openai(openai_face, None, CHAT)
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    status, body, _ = _openai(openai_face, "sk-reader", CHAT)
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        403, "permission_error", "model_not_allowed")
    status, body, _ = _openai(openai_face, "sk-nightly", {**CHAT, "service_tier": "priority"})
    assert (status, body["error"]["param"]) == (400, "service_tier"), body
    status, body, _ = _openai(openai_face, "sk-nightly", {**CHAT, "service_tier": "flex"})
    assert status == 200
    # Served: the tenant's per-minute window in OpenAI's headers.
    status, body, headers = _openai(openai_face, "sk-metered", CHAT)
    assert status == 200
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-ratelimit-limit-tokens"] == "400"
    remaining = int(lower["x-ratelimit-remaining-tokens"])
    assert 0 <= remaining < 400
    assert re.fullmatch(r"\d+(ms|s)|\d+m\d+s", lower["x-ratelimit-reset-tokens"])
    # Until the budget is spent: then 429 rate_limit_error with Retry-After.
    for _ in range(40):
        status, body, headers = _openai(openai_face, "sk-metered", CHAT)
        if status != 200:
            break
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429, "rate_limit_error", "quota_exceeded"), body
    lower = {k.lower(): v for k, v in headers.items()}
    assert float(lower["retry-after"]) > 0
    # The refusal carries the tenant's windows too: the limit, what is left
    # (less than this request needs) and when the window empties.
    assert lower["x-ratelimit-limit-tokens"] == "400"
    assert 0 <= int(lower["x-ratelimit-remaining-tokens"]) < 400
    assert re.fullmatch(r"\d+(ms|s)|\d+m\d+s", lower["x-ratelimit-reset-tokens"])
    assert "x-ratelimit-limit-requests" not in lower  # the tenant has no request limit


def test_a_tenants_file_with_an_error_stops_the_router(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants:\n  - name: a\n    keys: [k]\n    limits: {concurrent: 0}\n")
    router = RouterPart(tmp_path, {"qwen2": [f"127.0.0.1:{free_port()}"]},
                        "--tenants-file", str(bad))
    router.spawn()
    assert router.wait(30) != 0
    assert re.search(r"tenants\.yaml:4", router.tail()), router.tail()


def test_input_tokens_are_counted_by_the_engine(mesh: TwoRouters) -> None:
    """CountTokens through the router: the adapter renders the prompt and its
    engine's /tokenize counts it, as many tokens as the generation's input."""
    import grpc
    from llmmesh.v1 import generate_pb2 as pb
    from llmmesh.v1 import generate_pb2_grpc as pb_grpc

    key = (("authorization", "Bearer sk-nightly"),)
    request = pb.GenerateRequest(model_id="qwen2", inputs="one two three four",
                                 parameters=pb.GenerationParameters(max_new_tokens=2))
    with grpc.insecure_channel(mesh.routers[1].address) as channel:
        stub = pb_grpc.GenerateServiceStub(channel)
        counted = stub.CountTokens(pb.CountTokensRequest(request=request), metadata=key,
                                   timeout=10)
        generated = stub.Generate(request, metadata=key, timeout=10)
    assert counted.exact and counted.input_tokens == generated.input_tokens > 0


def test_tenants_reload_on_change_and_sighup_without_dropping_a_request(
    tmp_path: Path, mesh: TwoRouters
) -> None:
    import signal

    import grpc
    from llmmesh.v1 import generate_pb2 as pb
    from llmmesh.v1 import generate_pb2_grpc as pb_grpc

    adapter = mesh.parts[1]
    assert isinstance(adapter, AdapterPart)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - name: first\n    keys: [sk-first]\n")
    router = RouterPart(tmp_path, {"qwen2": [adapter.address]}, "--tenants-file", str(tenants))
    router.start()
    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.GenerateServiceStub(channel)

            def generate(key: str, tokens: int = 2) -> Any:
                return stub.Generate(pb.GenerateRequest(
                    model_id="qwen2", inputs="a b c d e f g h i j k l",
                    parameters=pb.GenerationParameters(max_new_tokens=tokens)),
                    metadata=(("authorization", f"Bearer {key}"),), timeout=20)

            def refused(key: str) -> bool:
                try:
                    generate(key)
                except grpc.RpcError as exc:
                    return exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

            assert generate("sk-first").tokens > 0 and refused("sk-second")
            # A stream under way while the file changes keeps going to its end
            # (slowed to 0.3 s a token: 3.6 s, past the reload).
            double = mesh.parts[0]
            assert isinstance(double, DoublePart)
            double.control(token_delay=0.3)
            stream = stub.GenerateStream(pb.GenerateStreamRequest(
                model_id="qwen2", inputs="go", parameters=pb.GenerationParameters(
                    max_new_tokens=12)),
                metadata=(("authorization", "Bearer sk-first"),), timeout=30)
            tenants.write_text("tenants:\n  - name: second\n    keys: [sk-second]\n")
            deadline = time.monotonic() + 10
            while refused("sk-second"):
                assert time.monotonic() < deadline, "the changed file was not reloaded"
                time.sleep(0.2)
            assert refused("sk-first")
            last = list(stream)[-1]
            double.control()  # the double's own pace again
            assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.tokens == 12
            # A file with an error keeps the tenants in force and names the line.
            tenants.write_text("tenants:\n  - name: third\n    keys: [sk-third]\n"
                               "    weight: -1\n")
            router.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "tenants.yaml:4" not in router.log.read_text():
                assert time.monotonic() < deadline, router.tail()
                time.sleep(0.2)
            assert generate("sk-second").tokens > 0 and refused("sk-third")
            # SIGHUP reads a fixed file at once.
            tenants.write_text("tenants:\n  - name: third\n    keys: [sk-third]\n")
            router.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while refused("sk-third"):
                assert time.monotonic() < deadline, router.tail()
                time.sleep(0.1)
            assert "sk-" not in router.log.read_text()
    finally:
        router.stop()
