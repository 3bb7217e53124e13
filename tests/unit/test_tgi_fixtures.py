"""The adapter's TGI client against real TGI responses (tests/data/tgi/).

A replay server answers with a fixture's status, headers and body, byte for
byte, on the route the adapter uses (TGI's `/`, or `/info`); the adapter
must read each as TGI meant it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.adapter.engines.base import EngineResult, EngineToken
from services.adapter.engines.tgi import TGIEngine
from services.common.errors import MeshError, Reason
from services.common.types import FinishReason, Parameters

FIXTURES = Path(__file__).parents[1] / "data" / "tgi"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


def _response(fix: dict[str, Any], *, compat: bool) -> web.Response:
    body = fix["body"]
    if isinstance(body, str):  # a Server-Sent Events stream, as sent
        raw = body.encode()
    else:
        # TGI's `/` wraps a successful unary reply in a list (server.rs, compat_generate).
        raw = json.dumps([body] if compat and fix["status"] == 200 else body).encode()
    headers = {k: v for k, v in fix["headers"].items() if k != "content-type"}
    return web.Response(status=fix["status"], body=raw, headers=headers,
                        content_type=fix["headers"]["content-type"])


Reply = str | dict[str, Any]  # a fixture's file name, or a fixture itself


class Replay:
    """Serves `unary`, `stream` and `info` fixtures; records what was asked."""

    def __init__(self, unary: Reply | None = None, stream: Reply | None = None) -> None:
        self.unary, self.stream = unary, stream
        self.requests: list[dict[str, Any]] = []

    async def compat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        reply = self.stream if body.get("stream") else self.unary
        assert reply is not None, body
        return _response(reply if isinstance(reply, dict) else fixture(reply), compat=True)

    async def info(self, request: web.Request) -> web.Response:
        return _response(fixture("info.json"), compat=False)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    backends: list[TGIEngine] = []

    async def start(replay: Replay) -> TGIEngine:
        app = web.Application()
        app.router.add_post("/", replay.compat)
        app.router.add_get("/info", replay.info)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        backends.append(TGIEngine(f"http://127.0.0.1:{port}"))
        return backends[-1]

    yield start
    for backend in backends:
        await backend.close()
    for runner in runners:
        await runner.cleanup()


PARAMS = Parameters(max_new_tokens=10)


async def test_generate_reads_tgis_reply(serve):
    replay = Replay(unary="generate.json")
    backend = await serve(replay)
    fix = fixture("generate.json")
    result = await backend.generate("Test request", PARAMS, timeout=5)
    assert result == EngineResult(
        text=fix["body"]["generated_text"],
        generated_tokens=fix["body"]["details"]["generated_tokens"],
        input_tokens=int(fix["headers"]["x-prompt-tokens"]),
        finish_reason=FinishReason.LENGTH,
    )
    # What the adapter sent is what TGI's `/` takes (the client's request model).
    (sent,) = replay.requests
    assert sent["inputs"] == "Test request" and sent["stream"] is False
    assert sent["parameters"]["details"] is True
    assert sent["parameters"]["max_new_tokens"] == 10


async def test_stream_reads_tgis_events(serve):
    backend = await serve(Replay(stream="generate_stream.json"))
    fix = fixture("generate_stream.json")
    out = [e async for e in backend.generate_stream("Test request", PARAMS, timeout=5)]
    *tokens, last = out
    assert all(isinstance(t, EngineToken) for t in tokens)
    events = [json.loads(line[5:]) for line in fix["body"].splitlines()
              if line.startswith("data:")]
    # Every token's text arrives, in order, and adds up to the final text.
    assert "".join(t.text for t in tokens) == "".join(e["token"]["text"] for e in events)
    assert sum(t.count for t in tokens) == len(events)
    details = events[-1]["details"]
    assert last == EngineResult(
        text=events[-1]["generated_text"],
        generated_tokens=details["generated_tokens"],
        input_tokens=details["input_length"],
        finish_reason=FinishReason.LENGTH,
    )
    assert last.text == "".join(t.text for t in tokens)


async def test_stream_final_event_without_details(serve):
    """A last event whose details are null (a request without details)."""
    backend = await serve(Replay(stream="generate_stream_final_no_details.json"))
    token, last = [e async for e in backend.generate_stream("x", PARAMS, timeout=5)]
    assert token == EngineToken(".")
    assert isinstance(last, EngineResult)
    assert last.text == "This is a picture of an anthropomorphic rabbit in a space suit."


@pytest.mark.parametrize(
    ("name", "reason", "error_type"),
    [
        ("error_422_validation.json", Reason.INVALID_ARGUMENT, "validation"),
        ("error_424_generation.json", Reason.MODEL_ERROR, "generation"),
        ("error_429_overloaded.json", Reason.OVERLOADED, "overloaded"),
    ],
)
async def test_error_replies(serve, name, reason, error_type):
    fix = fixture(name)
    backend = await serve(Replay(unary=name, stream=name))
    with pytest.raises(MeshError) as unary:
        await backend.generate("x", PARAMS, timeout=5)
    with pytest.raises(MeshError) as stream:
        _ = [e async for e in backend.generate_stream("x", PARAMS, timeout=5)]
    for caught in (unary.value, stream.value):
        assert caught.reason is reason
        assert caught.message == fix["body"]["error"]  # TGI's own words reach the client
        assert caught.metadata == {"backend_status": str(fix["status"]),
                                   "backend_error_type": error_type}


async def test_in_band_stream_error(serve):
    """TGI reports a stream's validation error as its one event, after a 200."""
    fix = fixture("generate_stream_error_validation.json")
    backend = await serve(Replay(stream="generate_stream_error_validation.json"))
    with pytest.raises(MeshError) as caught:
        _ = [e async for e in backend.generate_stream("x", PARAMS, timeout=5)]
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert caught.value.message == json.loads(fix["body"][len("data:"):])["error"]


async def test_generation_error_midstream(serve):
    """Two of the stream's token events, then TGI's generation error as an
    event (the 424's body: server.rs, impl From<InferError> for Event)."""
    stream = fixture("generate_stream.json")
    error = fixture("error_424_generation.json")["body"]
    events = [b for b in stream["body"].split("\n\n") if b.startswith("data:")][:2]
    composed = {**stream, "body": "".join(f"{e}\n\n" for e in events)
                + "data:" + json.dumps(error, separators=(",", ":")) + "\n\n"}
    backend = await serve(Replay(stream=composed))
    out: list[Any] = []
    with pytest.raises(MeshError) as caught:
        async for event in backend.generate_stream("x", PARAMS, timeout=5):
            out.append(event)
    texts = [json.loads(e[len("data:"):])["token"]["text"] for e in events]
    assert "".join(t.text for t in out) == "".join(texts)  # what came before is kept
    assert caught.value.reason is Reason.MODEL_ERROR
    assert caught.value.message == error["error"]


async def test_info(serve):
    backend = await serve(Replay())
    body = fixture("info.json")["body"]
    info = await backend.info()
    assert (info.model_id, info.max_input_tokens, info.max_total_tokens,
            info.max_stop_sequences, info.max_concurrent_requests) == (
        body["model_id"], body["max_input_tokens"], body["max_total_tokens"],
        body["max_stop_sequences"], body["max_concurrent_requests"])
