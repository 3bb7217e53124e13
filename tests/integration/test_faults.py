"""Faults injected into the real processes: a backend that crashes in the
middle of a stream or stops answering, an adapter replica killed, the router
restarted under load, and graceful shutdown (SIGTERM) of router and adapter.

The mesh here is assembled part by part (see tests/harness/parts.py): two TGI doubles,
two adapter replicas of qwen2 in front of them, the router and Envoy, so that
any one process can be killed and started again on the same port.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from llmmesh.v1 import generate_pb2 as pb

from tests.harness.parts import (
    NOT_SERVING,
    SERVING,
    AdapterPart,
    DoublePart,
    EnvoyPart,
    HealthWatch,
    Part,
    RouterPart,
    error_details,
    health_status,
    http_json,
    ready_replicas,
    sse_events,
    start_all,
    stop_all,
    stub,
)
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration

# The router's deadline for requests that bring none (its --timeout flag).
ROUTER_TIMEOUT = 3.0
# Seconds the router and the adapters give open requests when stopped.
GRACE = 6.0
JSON = {"Content-Type": "application/json"}


@dataclass
class FaultMesh:
    doubles: dict[str, DoublePart]  # "a", "b"
    adapters: dict[str, AdapterPart]  # "a" in front of double "a", ...
    router: RouterPart
    envoy: EnvoyPart

    @property
    def parts(self) -> list[Part]:
        return [*self.doubles.values(), *self.adapters.values(), self.router, self.envoy]

    def restore(self) -> None:
        """Every process running again, doubles back to normal, both replicas serving."""
        dead = [p for p in self.parts if not p.alive]
        start_all(dead)
        for double in self.doubles.values():
            double.reset()
        eventually(lambda: ready_replicas(self.router.address, "qwen2") == 2)
        eventually(lambda: http_json("GET", f"{self.envoy.http}/v1/mesh/models")[0] == 200)

    def generations(self, key: str) -> int:
        """A counter of the doubles' /_stats, summed over both."""
        return sum(int(d.stats()[key]) for d in self.doubles.values())


@pytest.fixture(scope="module")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    tmp = tmp_path_factory.mktemp("faults")
    doubles = {name: DoublePart(f"double-{name}", tmp) for name in "ab"}
    adapters = {
        name: AdapterPart(f"adapter-{name}", tmp, "qwen2", doubles[name], "--grace", str(GRACE))
        for name in "ab"
    }
    # These tests place requests by the router's own count (two streams on
    # two replicas): an engine's load report, sampled twice a second, could
    # still show the previous test's generations. The load-aware policy has
    # tests of its own (tests/unit/test_replica_choice.py).
    router = RouterPart(
        tmp, {"qwen2": [a.address for a in adapters.values()]},
        "--timeout", str(ROUTER_TIMEOUT), "--grace", str(GRACE),
        "--replica-choice", "in-flight",
    )
    mesh = FaultMesh(doubles, adapters, router, EnvoyPart(tmp, router.port))
    try:
        start_all(mesh.parts)
        yield mesh
    finally:
        stop_all(mesh.parts)


@pytest.fixture
def faults(fault_mesh: FaultMesh) -> Iterator[FaultMesh]:
    fault_mesh.restore()
    yield fault_mesh
    for double in fault_mesh.doubles.values():
        if double.alive:
            double.reset()


def control_all(mesh: FaultMesh, **state: Any) -> None:
    for double in mesh.doubles.values():
        double.control(**state)


def good_request(mesh: FaultMesh) -> None:
    reply = stub(mesh.router.address).Generate(
        pb.GenerateRequest(model_id="qwen2", inputs="still here"), timeout=10)
    assert reply.generated_text == "still here"


# -- a backend that crashes in the middle of a stream ---------------------------------


def test_backend_crash_midstream_over_http(faults: FaultMesh) -> None:
    """An in-band error event, promptly; the adapter's health follows the
    backend down and back up again without a restart of the adapter."""
    control_all(faults, mode="crash_midstream", after_tokens=2)
    started = time.monotonic()
    events = list(sse_events(f"{faults.envoy.http}/v1/generate_stream",
                             {"model_id": "qwen2", "inputs": "one two three four five"}))
    assert time.monotonic() - started < 5
    assert "".join(e["text"] for e in events[:-1]) == "one two"
    last = events[-1]
    assert last["finish_reason"] == "FINISH_REASON_ERROR"
    assert last["error"]["code"] == "UNAVAILABLE"
    assert last["error"]["reason"] == "INCOMPLETE_GENERATION"

    # Exactly the backend that served the stream is gone.
    eventually(lambda: sum(not d.alive for d in faults.doubles.values()) == 1)
    name = next(n for n, d in faults.doubles.items() if not d.alive)
    assert faults.doubles[name].wait(5) == 3  # the double's crash exit status
    survivor = faults.doubles["b" if name == "a" else "a"]
    survivor.reset()
    adapter = faults.adapters[name]
    adapter_pid = adapter.pid
    eventually(lambda: health_status(adapter.address) == NOT_SERVING)
    eventually(lambda: ready_replicas(faults.router.address, "qwen2") == 1)
    good_request(faults)  # the other replica serves meanwhile

    faults.doubles[name].start()  # the backend returns, on the same port
    eventually(lambda: health_status(adapter.address) == SERVING)
    eventually(lambda: ready_replicas(faults.router.address, "qwen2") == 2)
    assert adapter.alive and adapter.pid == adapter_pid  # never restarted


def test_backend_crash_midstream_over_grpc(faults: FaultMesh) -> None:
    """A stream ends with an error message; a unary call gets a status."""
    control_all(faults, mode="crash_midstream", after_tokens=2)
    started = time.monotonic()
    replies = list(stub(faults.router.address).GenerateStream(
        pb.GenerateStreamRequest(model_id="qwen2", inputs="one two three four"), timeout=10))
    assert time.monotonic() - started < 5
    assert "".join(r.text for r in replies[:-1]) == "one two"
    assert replies[-1].finish_reason == pb.FINISH_REASON_ERROR
    assert (replies[-1].error.code, replies[-1].error.reason) == (
        "UNAVAILABLE", "INCOMPLETE_GENERATION")

    # Unary: the backend dies before answering. The router tries the other
    # replica once (UNAVAILABLE before any text), whose backend dies the same
    # way, and then gives up with the status: no endless retries, no hang.
    for double in faults.doubles.values():
        if not double.alive:
            double.start()
        double.control(mode="crash_midstream", after_tokens=0)
    eventually(lambda: ready_replicas(faults.router.address, "qwen2") == 2)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub(faults.router.address).Generate(
            pb.GenerateRequest(model_id="qwen2", inputs="one two"), timeout=10)
    assert time.monotonic() - started < 5
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)["reason"] == "INCOMPLETE_GENERATION"
    assert not any(d.alive for d in faults.doubles.values())


# -- an adapter replica killed ---------------------------------------------------------


def test_adapter_killed_new_requests_fail_over(faults: FaultMesh) -> None:
    control_all(faults, token_delay=0.1)
    router = stub(faults.router.address)
    words = " ".join(f"w{i}" for i in range(20))
    # Least-in-flight balancing puts the two streams on different replicas.
    streams = [router.GenerateStream(pb.GenerateStreamRequest(model_id="qwen2", inputs=words),
                                     timeout=30) for _ in range(2)]
    firsts = [next(s) for s in streams]
    assert all(f.text.startswith("w0") for f in firsts)
    active = {n: d.stats()["generations_active"] for n, d in faults.doubles.items()}
    assert active == {"a": 1, "b": 1}
    victim, other = faults.adapters["a"], faults.adapters["b"]
    # Which stream is on replica a is not known; the one that breaks is.
    victim.signal(signal.SIGKILL)
    victim.wait(5)

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(
            lambda i: router.Generate(pb.GenerateRequest(model_id="qwen2", inputs=f"after {i}"),
                                      timeout=10),
            range(6)))
    assert [r.generated_text for r in replies] == [f"after {i}" for i in range(6)]
    assert time.monotonic() - started < 5

    outcomes = [list(s) for s in streams]
    ends = [o[-1] for o in outcomes]
    broken = [e for e in ends if e.finish_reason == pb.FINISH_REASON_ERROR]
    finished = [e for e in ends if e.finish_reason == pb.FINISH_REASON_EOS_TOKEN]
    assert len(broken) == 1 and len(finished) == 1, ends
    assert broken[0].error.code == "UNAVAILABLE"
    assert finished[0].generated_text == words  # the other replica's stream: untouched
    # The killed adapter's backend request was dropped with it.
    eventually(lambda: faults.doubles["a"].stats()["generations_cancelled"] == 1)
    assert faults.doubles["a"].stats()["generations_active"] == 0
    assert other.alive and health_status(other.address) == SERVING


# -- a backend that stops answering ------------------------------------------------------


def test_hung_backend_hits_the_deadline_and_is_cancelled(faults: FaultMesh) -> None:
    """Client deadline over gRPC; the router's --timeout when the client sets
    none, over gRPC and HTTP (unary 504, stream in-band); every backend
    request is cancelled."""
    control_all(faults, mode="hang")
    router = stub(faults.router.address)

    def grpc_unary(timeout: float | None) -> tuple[float, Any]:
        started = time.monotonic()
        try:
            router.Generate(pb.GenerateRequest(model_id="qwen2", inputs="x"), timeout=timeout)
        except grpc.RpcError as exc:
            return time.monotonic() - started, (exc.code(), error_details(exc)["reason"])
        raise AssertionError("a hung backend answered")

    def http_unary() -> tuple[float, Any]:
        started = time.monotonic()
        status, ctype, raw = http_json("POST", f"{faults.envoy.http}/v1/generate",
                                       json.dumps({"model_id": "qwen2", "inputs": "x"}).encode(),
                                       JSON)
        return time.monotonic() - started, (status, ctype, json.loads(raw)["code"])

    def http_stream() -> tuple[float, Any]:
        started = time.monotonic()
        status, ctype, raw = http_json("POST", f"{faults.envoy.http}/v1/generate_stream",
                                       json.dumps({"model_id": "qwen2", "inputs": "x"}).encode(),
                                       JSON)
        return time.monotonic() - started, (status, ctype, json.loads(raw)["code"])

    with ThreadPoolExecutor(4) as pool:
        client = pool.submit(grpc_unary, 1.0)
        default = pool.submit(grpc_unary, None)
        http = pool.submit(http_unary)
        streamed = pool.submit(http_stream)
        results = [f.result(timeout=30) for f in (client, default, http, streamed)]

    (t_client, client_error), (t_default, default_error) = results[0], results[1]
    assert client_error[0] == grpc.StatusCode.DEADLINE_EXCEEDED and t_client < 2.5
    assert default_error == (grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT")
    assert ROUTER_TIMEOUT - 0.5 < t_default < ROUTER_TIMEOUT + 2.5
    # Over HTTP, unary and stream alike (no token had been sent): 504 JSON.
    for elapsed, http_error in results[2:]:
        assert http_error == (504, "application/json", 4)
        assert ROUTER_TIMEOUT - 0.5 < elapsed < ROUTER_TIMEOUT + 2.5
    # Each request reached one backend and was cancelled there, not left running.
    eventually(lambda: faults.generations("generations_cancelled") == 4)
    assert faults.generations("generations_active") == 0
    faults.doubles["a"].reset()
    faults.doubles["b"].reset()
    good_request(faults)


def test_hung_stream_after_some_tokens_ends_in_band(faults: FaultMesh) -> None:
    control_all(faults, mode="hang", after_tokens=2)
    started = time.monotonic()
    events = list(sse_events(f"{faults.envoy.http}/v1/generate_stream",
                             {"model_id": "qwen2", "inputs": "one two three"}))
    assert time.monotonic() - started < ROUTER_TIMEOUT + 2.5
    assert "".join(e["text"] for e in events[:-1]) == "one two"
    assert events[-1]["finish_reason"] == "FINISH_REASON_ERROR"
    assert events[-1]["error"]["code"] == "DEADLINE_EXCEEDED"
    eventually(lambda: faults.generations("generations_cancelled") == 1)


# -- the router restarted under load ------------------------------------------------------


def test_router_restart_under_load(faults: FaultMesh) -> None:
    """SIGTERM and start again on the same port while 4 clients keep sending
    through Envoy. Requests in flight on the old router finish (graceful
    drain); only requests that arrive while no router listens fail, each at
    once with Envoy's 503 JSON (a new router that has not yet checked its
    adapters waits for that rather than answer MODEL_UNAVAILABLE); afterwards
    Envoy recovers by itself."""
    control_all(faults, token_delay=0.1)  # each request takes ~0.4 s
    body = json.dumps({"model_id": "qwen2", "inputs": "a b c",
                       "parameters": {"max_new_tokens": 4}}).encode()
    results: list[tuple[float, float, int, bytes]] = []
    stop = threading.Event()

    def client(delay: float) -> None:
        time.sleep(delay)  # staggered, so that some are always in flight
        while not stop.is_set():
            started = time.monotonic()
            status, _, raw = http_json("POST", f"{faults.envoy.http}/v1/generate", body, JSON)
            results.append((started, time.monotonic(), status, raw))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i * 0.1,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        t_term = time.monotonic()
        faults.router.signal(signal.SIGTERM)
        assert faults.router.wait(GRACE + 5) == 0
        faults.router.start()
        t_ready = time.monotonic()
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    # A request that reaches the router in the very instant of SIGTERM may be
    # cancelled rather than served (grpc.aio's stop() does not wait for RPCs
    # whose coroutine has not started: grpc/grpc#37239); every other one that
    # was in flight is drained.
    instant = 0.05
    in_flight = [r for r in results if r[0] < t_term - instant and r[1] > t_term]
    window = [r for r in results if t_term - instant <= r[0] <= t_ready + 0.5]
    outside = [r for r in results if r not in window]
    failed = [r for r in results if r[2] != 200]
    print(f"\nrouter restart: {len(results)} requests, {len(in_flight)} in flight at SIGTERM, "
          f"{len(window)} sent while it restarted ({t_ready - t_term:.2f} s), "
          f"{len(failed)} failed: {dict(Counter(r[2] for r in failed))}")
    assert in_flight, "the load kept requests in flight"
    assert all(r[2] == 200 for r in outside), "in-flight requests drained; Envoy recovered"
    assert any(r[0] > t_ready + 0.5 for r in outside)
    for started, ended, status, raw in failed:
        assert ended - started < 3, "failures are prompt"
        answer = json.loads(raw)
        if status == 503:
            # Envoy's own reply, as no router listened: a new router that has
            # not checked its adapters yet waits rather than answer
            # MODEL_UNAVAILABLE.
            assert answer["code"] == 14, raw
            assert [d["reason"] for d in answer["details"]] == ["ROUTER_UNAVAILABLE"], raw
        else:
            assert (status, answer["code"]) == (499, 1), raw  # CANCELLED at the instant
    assert sum(r[2] == 499 for r in failed) <= 2


# -- graceful shutdown ------------------------------------------------------------------------


def test_adapter_sigterm_drains_and_new_requests_go_elsewhere(faults: FaultMesh) -> None:
    control_all(faults, token_delay=0.15)
    router = stub(faults.router.address)
    words = " ".join(f"w{i}" for i in range(12))  # ~2 s of tokens
    stream = router.GenerateStream(pb.GenerateStreamRequest(model_id="qwen2", inputs=words),
                                   timeout=30)
    assert next(stream).text.startswith("w0")
    name = next(n for n, d in faults.doubles.items() if d.stats()["generations_active"] == 1)
    draining, other = faults.adapters[name], faults.adapters["b" if name == "a" else "a"]
    other_double = faults.doubles["b" if name == "a" else "a"]
    control_all(faults, token_delay=0.0)  # new requests are quick; the open stream keeps its pace
    watch = HealthWatch(draining.address)
    try:
        eventually(lambda: watch.first(SERVING) is not None)
        t_term = time.monotonic()
        draining.signal(signal.SIGTERM)
        eventually(lambda: watch.first(NOT_SERVING) is not None, timeout=5)
    finally:
        watch.close()
    not_serving = watch.first(NOT_SERVING)
    assert not_serving is not None and not_serving - t_term < 1.0

    before = other_double.stats()["generations_completed"]
    replies = [router.Generate(pb.GenerateRequest(model_id="qwen2", inputs=f"new {i}"),
                               timeout=10) for i in range(5)]
    assert [r.generated_text for r in replies] == [f"new {i}" for i in range(5)]
    assert other_double.stats()["generations_completed"] == before + 5  # all went elsewhere

    rest = list(stream)  # the open stream finishes, within the grace period
    assert rest[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert rest[-1].generated_text == words
    assert time.monotonic() - t_term < GRACE
    assert draining.wait(GRACE + 5) == 0
    assert other.alive


def test_router_sigterm_drains_open_streams(faults: FaultMesh) -> None:
    """Health says NOT_SERVING first, the open stream (through Envoy) finishes,
    new requests are refused at once (a single router: nothing else to go
    to, so Envoy answers 503 without waiting), the process exits cleanly."""
    control_all(faults, token_delay=0.15)
    words = " ".join(f"w{i}" for i in range(12))
    events = sse_events(f"{faults.envoy.http}/v1/generate_stream",
                        {"model_id": "qwen2", "inputs": words})
    assert next(events)["text"].startswith("w0")
    watch = HealthWatch(faults.router.address)
    try:
        eventually(lambda: watch.first(SERVING) is not None)
        t_term = time.monotonic()
        faults.router.signal(signal.SIGTERM)
        eventually(lambda: watch.first(NOT_SERVING) is not None, timeout=5)
    finally:
        watch.close()
    not_serving = watch.first(NOT_SERVING)
    assert not_serving is not None and not_serving - t_term < 1.0

    started = time.monotonic()
    status, ctype, raw = http_json("POST", f"{faults.envoy.http}/v1/generate",
                                   json.dumps({"model_id": "qwen2", "inputs": "x"}).encode(),
                                   JSON)
    assert (status, ctype) == (503, "application/json") and json.loads(raw)["code"] == 14
    assert time.monotonic() - started < 3

    rest = list(events)
    assert rest[-1]["finish_reason"] == "FINISH_REASON_EOS_TOKEN"
    assert rest[-1]["generated_text"] == words
    assert time.monotonic() - t_term < GRACE
    assert faults.router.wait(GRACE + 5) == 0


def test_injected_faults_are_no_bugs_in_the_logs(fault_mesh: FaultMesh) -> None:
    """Every fault above was answered through the error table: no service
    logged an unhandled exception of its own (the INTERNAL path)."""
    for part in (*fault_mesh.adapters.values(), fault_mesh.router):
        assert part.logs
        for log in part.logs:
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue  # not a log record (e.g. grpc's own stderr at exit)
                record = json.loads(line)
                if record.get("logger", "").startswith("llmmesh"):
                    assert "exc" not in record, (log.name, record)
