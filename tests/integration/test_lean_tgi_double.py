"""The lean TGI double that `make bench` runs, spoken to by the adapter's own
TGI client: it must meet the same contract as the full double (unary on `/`
as a JSON array, SSE with a final event, 422 for bad input, /health, /info),
or the bench would measure errors instead of the mesh."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from services.adapter.engines.base import EngineResult, EngineToken
from services.adapter.engines.tgi import TGIEngine
from services.common.errors import MeshError, Reason
from services.common.types import FinishReason, Parameters
from tests.harness.procs import free_port, python_module, start, stop, wait_http


@pytest.fixture(scope="module")
def lean() -> Iterator[str]:
    port = free_port()
    proc = start(python_module("tools.lean_tgi_double", "--port", str(port),
                               "--model-id", "lean/test"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 30, proc)
        yield url
    finally:
        assert stop(proc) == 0  # SIGTERM: a clean exit


async def test_the_adapter_client_gets_what_it_asked_for(lean: str) -> None:
    backend = TGIEngine(lean)
    try:
        info = await backend.info()
        assert info.model_id == "lean/test" and info.max_total_tokens == 4096
        assert await backend.health()
        result = await backend.generate("a b c", Parameters(max_new_tokens=5), timeout=5)
        assert result == EngineResult("w0 w1 w2 w3 w4", 5, 3, FinishReason.LENGTH)
        parts = [p async for p in backend.generate_stream(
            "a b", Parameters(max_new_tokens=7), timeout=5)]
        tokens = [p for p in parts if isinstance(p, EngineToken)]
        assert sum(t.count for t in tokens) == 7
        assert parts[-1] == EngineResult("w0 w1 w2 w3 w4 w5 w6", 7, 2, FinishReason.LENGTH)
        with pytest.raises(MeshError) as err:
            await backend.generate(" ", Parameters(max_new_tokens=5), timeout=5)
        assert err.value.reason == Reason.INVALID_ARGUMENT
    finally:
        await backend.close()


def test_a_slow_stream_ends_early_with_eos_when_told(lean: str) -> None:
    def post(path: str, body: dict[str, object]) -> bytes:
        request = urllib.request.Request(f"{lean}{path}", json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return bytes(resp.read())

    post("/_control", {"token_delay": 0.01, "reply_tokens": 2})
    try:
        raw = post("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}})
    finally:
        post("/_reset", {})
    events = [json.loads(block[5:]) for block in raw.split(b"\n\n") if block]
    assert [e["token"]["special"] for e in events] == [False, False, True]
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    with pytest.raises(urllib.error.HTTPError) as err:
        post("/nothing", {})
    assert err.value.code == 404
