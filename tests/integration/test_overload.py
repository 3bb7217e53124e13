"""Overload, with the real processes: each adapter admits at most K requests
(`make up`'s --max-concurrent-requests K, as its TGI server does) and refuses
the rest at once with RESOURCE_EXHAUSTED / HTTP 429 and a RetryInfo; admitted
requests carry on; a burst of 10x the limit leaves every process's memory
where it was; clients that leave free their backend slots.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from llmmesh.v1 import generate_pb2 as pb

from tests.harness.mesh import Mesh, running_mesh
from tests.harness.parts import error_details, http_json, rss_kib, stub
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration

K = 3  # concurrent requests per model, adapters and backends alike
TOKEN_DELAY = 0.1
JSON = {"Content-Type": "application/json"}
# What the tests measured, printed at the end of the module (pytest -s).
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def limited_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("overload")
    try:
        with running_mesh(tmp, "--max-concurrent-requests", str(K),
                          max_concurrent_requests=str(K)) as mesh:
            yield mesh
    finally:
        if FIGURES:
            print("\noverload figures:", json.dumps(FIGURES, indent=1))


@pytest.fixture
def limited(limited_mesh: Mesh) -> Iterator[Mesh]:
    """The mesh with K per model, doubles back to normal and idle after each test."""
    for double in limited_mesh.doubles.values():
        double.reset()
    yield limited_mesh
    for double in limited_mesh.doubles.values():
        eventually(lambda d=double: d.stats()["in_flight"] == 0)
        double.reset()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def hold(mesh: Mesh, n: int, tokens: int = 20) -> list[Any]:
    """`n` slow streams on qwen2, each past its first message (so admitted)."""
    router = stub(mesh.router)
    calls = [router.GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs=words(tokens)), timeout=60)
        for _ in range(n)]
    for call in calls:
        assert next(call).text.startswith("w0")
    return calls


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        out = fn(*args)
    except grpc.RpcError as exc:
        out = exc
    return time.monotonic() - started, out


def post(mesh: Mesh, path: str, body: dict[str, Any]) -> tuple[int, str, Any]:
    status, ctype, raw = http_json("POST", f"{mesh.http}{path}", json.dumps(body).encode(), JSON)
    return status, ctype, json.loads(raw) if ctype == "application/json" else raw


def test_beyond_the_limit_is_refused_at_once_with_a_retry_hint(limited: Mesh) -> None:
    limited.doubles["qwen2"].control(token_delay=TOKEN_DELAY)
    started = time.monotonic()
    held = hold(limited, K)
    router = stub(limited.router)
    request = pb.GenerateRequest(model_id="qwen2", inputs="one more")

    latencies: dict[str, float] = {}
    latencies["grpc unary"], error = timed(router.Generate, request, 10)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(error)
    assert details["reason"] == "OVERLOADED" and details["retry_delay"] == 1.0
    assert f"limit of {K} concurrent requests" in (error.details() or "")

    def first_message() -> Any:
        return next(router.GenerateStream(
            pb.GenerateStreamRequest(model_id="qwen2", inputs="one more"), timeout=10))

    latencies["grpc stream"], error = timed(first_message)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    for path in ("/v1/generate", "/v1/generate_stream"):
        latency, (status, ctype, body) = timed(
            post, limited, path, {"model_id": "qwen2", "inputs": "one more"})
        latencies[f"http {path}"] = latency
        assert (status, ctype) == (429, "application/json"), body
        assert body["code"] == 8
        kinds = {d["@type"].rsplit(".", 1)[-1]: d for d in body["details"]}
        assert kinds["ErrorInfo"]["reason"] == "OVERLOADED"
        assert kinds["RetryInfo"]["retry_delay"] == "1s"

    FIGURES["reject latency ms"] = {k: round(v * 1000, 1) for k, v in latencies.items()}
    assert max(latencies.values()) < 1.0, latencies  # generous: typically a few ms

    # The limit is per model: llama3 has its own.
    reply = router.Generate(pb.GenerateRequest(model_id="llama3", inputs="other model"),
                            timeout=10)
    assert reply.generated_text == "other model"

    # The refused requests never reached the backend; the admitted ones finish.
    for call in held:
        rest = list(call)
        assert rest[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN
        assert rest[-1].generated_text == words(20)
    elapsed = time.monotonic() - started
    FIGURES["admitted streams s (20 tokens x 0.1 s)"] = round(elapsed, 2)
    assert elapsed < 20 * TOKEN_DELAY * 2 + 2
    assert limited.doubles["qwen2"].stats()["requests"].get("POST /", 0) == K


def _pids(mesh: Mesh) -> dict[str, int]:
    """Every process of the mesh, by name: the launcher's children, the doubles."""
    out = {"launcher": mesh.launcher.pid}
    children = Path(f"/proc/{mesh.launcher.pid}/task/{mesh.launcher.pid}/children")
    for pid in map(int, children.read_text().split()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"services.adapter" in cmdline:
            name = "adapter-" + cmdline[cmdline.index(b"--model") + 1].decode()
        elif b"services.router" in cmdline:
            name = "router"
        else:
            name = Path(cmdline[0].decode()).name
        out[name] = pid
    for model, double in mesh.doubles.items():
        out[f"double-{model}"] = double.proc.pid
    return out


def test_a_burst_of_ten_times_the_limit_keeps_memory_bounded(limited: Mesh) -> None:
    limited.doubles["qwen2"].control(token_delay=0.02)
    pids = _pids(limited)
    assert {"envoy", "router", "adapter-qwen2"} <= set(pids)
    router = stub(limited.router)

    def one(i: int) -> tuple[str, float]:
        started = time.monotonic()
        inputs = words(10) + f" {i}"
        if i % 2:
            status, _, _ = http_json(
                "POST", f"{limited.http}/v1/generate",
                json.dumps({"model_id": "qwen2", "inputs": inputs}).encode(), JSON)
            outcome = {200: "ok", 429: "refused"}.get(status, f"http {status}")
        else:
            try:
                replies = list(router.GenerateStream(
                    pb.GenerateStreamRequest(model_id="qwen2", inputs=inputs), timeout=30))
                ok = replies[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN
                outcome = "ok" if ok else f"stream {replies[-1].error.code}"
            except grpc.RpcError as exc:
                refused = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                outcome = "refused" if refused else f"grpc {exc.code().name}"
        return outcome, time.monotonic() - started

    one(0)  # warm every path before the first reading
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    outcomes: Counter[str] = Counter()
    refused_latency: list[float] = []
    with ThreadPoolExecutor(10 * K) as pool:
        for _ in range(5):
            for outcome, latency in pool.map(one, range(10 * K)):
                outcomes[outcome] += 1
                if outcome == "refused":
                    refused_latency.append(latency)
    after = {name: rss_kib(pid) for name, pid in pids.items()}

    FIGURES["burst outcomes (5 x 30 concurrent)"] = dict(outcomes)
    FIGURES["RSS KiB before -> after"] = {n: f"{before[n]} -> {after[n]}" for n in pids}
    if refused_latency:
        FIGURES["burst reject latency ms (median, max)"] = (
            round(statistics.median(refused_latency) * 1000, 1),
            round(max(refused_latency) * 1000, 1))
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes["ok"] >= 5 * K and outcomes["refused"] > 0
    for name in pids:
        # Generous: allocator slack and caches, not a request-sized leak
        # (150 requests of which the refused ones hold nothing).
        assert after[name] < before[name] * 1.5 + 64 * 1024, (name, before[name], after[name])
    assert limited.doubles["qwen2"].stats()["in_flight"] == 0
    reply = router.Generate(pb.GenerateRequest(model_id="qwen2", inputs="after the burst"),
                            timeout=10)
    assert reply.generated_text == "after the burst"


def test_client_disconnects_free_their_backend_slots(limited: Mesh) -> None:
    double = limited.doubles["qwen2"]
    double.control(token_delay=0.2)
    calls = hold(limited, K - 1, tokens=50)
    # And one HTTP client, through Envoy, that will hang up.
    request = urllib.request.Request(
        f"{limited.http}/v1/generate_stream",
        data=json.dumps({"model_id": "qwen2", "inputs": words(50)}).encode(), method="POST")
    response = urllib.request.urlopen(request, timeout=30)
    assert next(iter(response)).startswith(b"data:")
    eventually(lambda: double.stats()["generations_active"] == K)
    router = stub(limited.router)
    small = pb.GenerateRequest(model_id="qwen2", inputs="in")
    with pytest.raises(grpc.RpcError) as full:
        router.Generate(small, timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    for call in calls:
        call.cancel()
    response.close()
    # Every backend generation is cancelled, and new requests get in again.
    eventually(lambda: double.stats()["generations_cancelled"] == K, timeout=10)
    assert double.stats()["generations_active"] == 0
    assert double.stats()["generations_completed"] == 0
    double.control(token_delay=0.0)
    eventually(lambda: _admitted(router, small), timeout=5)
    with ThreadPoolExecutor(K) as pool:
        replies = list(pool.map(lambda _: router.Generate(small, timeout=10), range(K)))
    assert [r.generated_text for r in replies] == ["in"] * K


def _admitted(router: Any, request: pb.GenerateRequest) -> bool:
    try:
        router.Generate(request, timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return False
        raise
    return True
