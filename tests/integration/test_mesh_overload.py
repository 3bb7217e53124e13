"""Overload of the mesh itself, with the real processes: a router bound of B
requests in flight (`--max-in-flight-total`), Envoy's circuit breakers just
above it, and 10x B streams at once through Envoy on each of the three APIs
(gRPC, HTTP/JSON, OpenAI). Every answer is a stream that runs at its pace or
a 429 in its API's shape with a retry hint: never a 5xx, a 499, a bare
CANCELLED or a reset connection, whether the router refused or Envoy did.
And 3,000 gRPC streams at once straight to the router: the same, past
gRPC's own limits on calls waiting for the server.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from llmmesh.v1 import generate_pb2 as pb
from llmmesh.v1 import generate_pb2_grpc as pb_grpc

from tests.harness.mesh import Mesh, running_mesh

pytestmark = pytest.mark.integration

BOUND = 4  # the router's --max-in-flight-total
STREAMS = 10 * BOUND  # per API, all at once
TOKENS = 20
TOKEN_DELAY = 0.05
INPUTS = " ".join(f"w{i}" for i in range(2 * TOKENS))


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh-overload")
    with running_mesh(tmp, "--max-in-flight-total", str(BOUND)) as mesh:
        mesh.doubles["qwen2"].control(token_delay=TOKEN_DELAY)
        yield mesh


class Outcome:
    """One request: 'ok' with its token times, or 'refused', or what went wrong."""

    def __init__(self, kind: str, times: list[float] | None = None, bad: str = "") -> None:
        self.kind, self.times, self.bad = kind, times or [], bad

    @property
    def pace(self) -> float:
        """Seconds per token after the first."""
        t = self.times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0


def _grpc_refusal(exc: grpc.aio.AioRpcError) -> Outcome:
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Outcome("bad", bad=f"grpc {exc.code().name}: {exc.details()}")
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    kinds: dict[str, Any] = {}
    for detail in status.details if status is not None else ():
        for name, cls in (("ErrorInfo", error_details_pb2.ErrorInfo),
                          ("RetryInfo", error_details_pb2.RetryInfo)):
            if detail.Is(cls.DESCRIPTOR):
                kinds[name] = cls()
                detail.Unpack(kinds[name])
    if "ErrorInfo" not in kinds or kinds["ErrorInfo"].reason != "OVERLOADED":
        return Outcome("bad", bad=f"grpc refusal without ErrorInfo OVERLOADED: {status}")
    if "RetryInfo" not in kinds or kinds["RetryInfo"].retry_delay.seconds < 1:
        return Outcome("bad", bad=f"grpc refusal without RetryInfo: {status}")
    return Outcome("refused")


async def grpc_stream(stub: pb_grpc.GenerateServiceStub) -> Outcome:
    times: list[float] = []
    request = pb.GenerateStreamRequest(
        model_id="qwen2", inputs=INPUTS, parameters=pb.GenerationParameters(max_new_tokens=TOKENS))
    try:
        async for reply in stub.GenerateStream(request, timeout=60):
            if reply.finish_reason == pb.FINISH_REASON_ERROR:
                return Outcome("bad", bad=f"stream error {reply.error.reason}")
            times.append(time.monotonic())
    except grpc.aio.AioRpcError as exc:
        if times:
            return Outcome("bad", bad=f"grpc {exc.code().name} mid-stream")
        return _grpc_refusal(exc)
    return Outcome("ok", times) if len(times) >= TOKENS else Outcome("bad", bad="short stream")


async def http_refusal(resp: aiohttp.ClientResponse, openai: bool) -> Outcome:
    raw = await resp.read()
    if resp.status != 429:
        return Outcome("bad", bad=f"http {resp.status}: {raw[:200]!r}")
    if resp.content_type != "application/json":
        return Outcome("bad", bad=f"429 as {resp.content_type}")
    body = json.loads(raw)
    if openai:
        error = body.get("error", {})
        if error.get("type") != "rate_limit_error" or error.get("code") != "overloaded":
            return Outcome("bad", bad=f"openai 429 body {body}")
        if int(resp.headers.get("Retry-After", "0")) < 1:
            return Outcome("bad", bad="openai 429 without Retry-After")
        return Outcome("refused")
    kinds = {d["@type"].rsplit(".", 1)[-1]: d for d in body.get("details", [])}
    if body.get("code") != 8 or kinds.get("ErrorInfo", {}).get("reason") != "OVERLOADED":
        return Outcome("bad", bad=f"429 body {body}")
    if "RetryInfo" not in kinds or int(resp.headers.get("Retry-After", "0")) < 1:
        return Outcome("bad", bad=f"429 without a retry hint: {dict(resp.headers)} {body}")
    return Outcome("refused")


async def sse_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     openai: bool) -> Outcome:
    times: list[float] = []
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return await http_refusal(resp, openai)
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if event.get("error"):
                    return Outcome("bad", bad=f"stream error {event['error']}")
                text = (event["choices"][0]["delta"].get("content") if openai and event.get(
                    "choices") else event.get("text"))
                if text:
                    times.append(time.monotonic())
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Outcome("bad", bad=f"{type(exc).__name__}: {exc}")
    return Outcome("ok", times) if len(times) >= TOKENS - 1 else Outcome(
        "bad", bad=f"short stream of {len(times)}")


async def burst(mesh: Mesh, n: int) -> dict[str, list[Outcome]]:
    """`n` streams at once on each API, through Envoy."""
    native = {"model_id": "qwen2", "inputs": INPUTS, "parameters": {"max_new_tokens": TOKENS}}
    chat = {"model": "qwen2", "messages": [{"role": "user", "content": INPUTS}],
            "max_tokens": TOKENS, "stream": True}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    channel = grpc.aio.insecure_channel(mesh.envoy)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            stub = pb_grpc.GenerateServiceStub(channel)
            tasks = {
                "grpc": [grpc_stream(stub) for _ in range(n)],
                "http": [sse_stream(session, f"{mesh.http}/v1/generate_stream", native, False)
                         for _ in range(n)],
                "openai": [sse_stream(session, f"{mesh.http}/v1/chat/completions", chat, True)
                           for _ in range(n)],
            }
            flat = [t for api in tasks.values() for t in api]
            results = await asyncio.gather(*flat)
        finally:
            await channel.close()
    out: dict[str, list[Outcome]] = {}
    i = 0
    for api, items in tasks.items():
        out[api] = list(results[i:i + len(items)])
        i += len(items)
    return out


def test_a_burst_past_the_bound_is_streams_at_pace_or_429s(bounded: Mesh) -> None:
    alone = asyncio.run(burst(bounded, 1))  # one stream per API: the pace alone
    assert all(o.kind == "ok" for api in alone.values() for o in api), {
        api: [o.bad for o in v] for api, v in alone.items()}
    single_pace = max(o.pace for api in alone.values() for o in api)

    outcomes = asyncio.run(burst(bounded, STREAMS))
    counts = {api: Counter(o.kind for o in items) for api, items in outcomes.items()}
    bad = sorted({o.bad for items in outcomes.values() for o in items if o.kind == "bad"})
    print("\nburst outcomes:", {api: dict(c) for api, c in counts.items()})
    assert not bad, bad
    ok = [o for items in outcomes.values() for o in items if o.kind == "ok"]
    refused = sum(c["refused"] for c in counts.values())
    assert ok and refused, counts
    # The admitted streams keep their pace: the bound is what the mesh relays.
    paces = [o.pace for o in ok]
    assert statistics.median(paces) < 1.5 * max(single_pace, TOKEN_DELAY), (paces, single_pace)
    assert max(paces) < 3 * max(single_pace, TOKEN_DELAY), (paces, single_pace)


def test_envoy_refuses_what_it_cannot_hand_over_as_429(bounded: Mesh) -> None:
    """Envoy's own refusals (circuit breaker overflow, flag UO) are in the
    burst, and answered through the error table like the router's."""
    before = len([line for line in bounded.log("envoy").splitlines() if '"UO"' in line])
    outcomes = asyncio.run(burst(bounded, STREAMS))
    assert not [o.bad for items in outcomes.values() for o in items if o.kind == "bad"]
    entries = [json.loads(line) for line in bounded.log("envoy").splitlines()
               if line.startswith("{")]
    overflow = [e for e in entries if e.get("flags") == "UO"]
    assert len(overflow) > before, "no request met Envoy's own limit"
    print("\nEnvoy's own refusals:", Counter(str(e["path"]) for e in overflow))
    # 429 on HTTP (the log's grpc_status there is the status Envoy would have
    # sent upstream); to a gRPC client HTTP 200 with grpc-status 8.
    answers = {(str(e["status"]), str(e["grpc_status"])) for e in overflow}
    assert {s for s, _ in answers} <= {"429", "200"}, overflow[:3]
    assert {g for s, g in answers if s == "200"} <= {"ResourceExhausted"}, overflow[:3]
    statuses = Counter(str(e.get("status")) for e in entries)
    assert set(statuses) <= {"200", "429"}, statuses


BURST = 3_000  # past gRPC's own limits on calls waiting for the server (1,000; 3,000)


async def whole_stream(stub: pb_grpc.GenerateServiceStub) -> Outcome:
    """One stream, judged by its end: all its tokens, or the bound's refusal.
    (Under the burst the router sends tokens that arrive together as one
    message, so its replies are fewer than its tokens.)"""
    request = pb.GenerateStreamRequest(
        model_id="qwen2", inputs=INPUTS, parameters=pb.GenerationParameters(max_new_tokens=TOKENS))
    last = None
    try:
        async for reply in stub.GenerateStream(request, timeout=60):
            last = reply
    except grpc.aio.AioRpcError as exc:
        if last is not None:
            return Outcome("bad", bad=f"grpc {exc.code().name} mid-stream")
        return _grpc_refusal(exc)
    if last is None or last.finish_reason == pb.FINISH_REASON_ERROR or last.tokens != TOKENS:
        return Outcome("bad", bad=f"stream ended {last}")
    return Outcome("ok")


async def router_burst(mesh: Mesh, n: int) -> list[Outcome]:
    """`n` gRPC streams at once, straight to the router, on one connection."""
    channel = grpc.aio.insecure_channel(mesh.router)
    try:
        stub = pb_grpc.GenerateServiceStub(channel)
        return list(await asyncio.gather(*(whole_stream(stub) for _ in range(n))))
    finally:
        await channel.close()


def test_a_burst_of_thousands_reaches_the_router_bound_not_grpc_s_queue(bounded: Mesh) -> None:
    """Calls the router's event loop has not yet taken up wait for it: each of
    a burst of thousands is a stream or the bound's OVERLOADED refusal, never
    the bare CANCELLED gRPC gives calls it drops from a full queue."""
    outcomes = asyncio.run(router_burst(bounded, BURST))
    counts = Counter(o.kind for o in outcomes)
    bad = Counter(o.bad for o in outcomes if o.kind == "bad")
    print("\nrouter burst outcomes:", dict(counts))
    assert not bad, bad
    assert counts["ok"] and counts["refused"], counts
