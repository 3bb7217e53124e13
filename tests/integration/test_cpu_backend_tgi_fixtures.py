"""The CPU backend speaks TGI's HTTP API as TGI does: its replies checked
against real TGI responses (tests/data/tgi/, each saying where it came from).

Run against the real CPU backend (llama.cpp + SmolLM2) and against the TGI
double (the same HTTP layer over a scripted engine, which can also fail a
generation on demand). The texts differ from TGI's, of course: what must be
the same is every field, its type, the framing, the statuses, the headers and
the words of the errors.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import free_port, python_module, start, stop, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FIXTURES = Path(__file__).parents[1] / "data" / "tgi"
MAX_INPUT, MAX_TOTAL = 768, 1024  # as docker-compose.yml runs TGI (and info.json says)
# router/src/lib.rs, struct Info: Option fields, null when the server does not know.
NULLABLE_INFO = {"model_sha", "model_pipeline_tag", "sha", "docker_label"}


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


def shape(value: Any) -> Any:
    """The JSON value with every leaf replaced by its type: what two servers
    answering different texts must still share."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(shape(v), sort_keys=True) for v in value})
    if value is None or isinstance(value, bool | str):
        return type(value).__name__
    return "int" if isinstance(value, int) else "float"


def sse_events(raw: str) -> list[dict[str, Any]]:
    """TGI's framing: `data:` and the JSON, no space; a blank line after each
    event; comment lines (`:`) are keep-alives."""
    assert raw.endswith("\n\n"), raw[-80:]
    events = []
    for block in raw[:-2].split("\n\n"):
        if block.startswith(":"):
            continue
        assert block.startswith("data:{") and "\n" not in block, block[:120]
        events.append(json.loads(block[len("data:"):]))
    return events


@dataclass
class Server:
    name: str
    url: str

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = 120) -> tuple[int, dict[str, str], str]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, _headers(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, _headers(err.headers), err.read().decode()


def _headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _start(name: str, tmp: Path, argv: list[str], port: int) -> Iterator[Server]:
    proc = start(argv, log_path=tmp / f"{name}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield Server(name, f"http://127.0.0.1:{port}")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def cpu_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    yield from _start("cpu-backend", tmp_path_factory.mktemp("cpu"), python_module(
        "services.cpu_backend", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-id", "/models/SmolLM2-135M-Instruct",
        "--max-concurrent-requests", "1", "--max-input-tokens", str(MAX_INPUT),
        "--max-total-tokens", str(MAX_TOTAL), "--threads", "1"), port)


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    yield from _start("double", tmp_path_factory.mktemp("double"), python_module(
        "tools.tgi_double", "--port", str(port), "--model-id", "double/model",
        "--max-concurrent-requests", "1", "--max-input-tokens", str(MAX_INPUT),
        "--max-total-tokens", str(MAX_TOTAL)), port)


@pytest.fixture(params=["cpu_backend", "double"])
def server(request: pytest.FixtureRequest) -> Server:
    found: Server = request.getfixturevalue(request.param)
    return found


# What the adapter sends (details on, no prompt logprobs), with the fixtures' prompt.
ASK = {"inputs": "Test request", "parameters": {"max_new_tokens": 10, "details": True}}


def test_generate_is_tgis_reply(server: Server) -> None:
    fix = fixture("generate.json")
    status, headers, raw = server.call("POST", "/generate", ASK)
    assert status == fix["status"], raw
    assert headers["content-type"].startswith(fix["headers"]["content-type"])
    assert set(fix["headers"]) <= set(headers), set(fix["headers"]) - set(headers)
    body = json.loads(raw)
    assert shape(body) == shape(fix["body"])
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert details["generated_tokens"] == len(details["tokens"]) == int(
        headers["x-generated-tokens"])
    assert body["generated_text"] == "".join(
        t["text"] for t in details["tokens"] if not t["special"])
    assert int(headers["x-prompt-tokens"]) > 0
    # The compat route `/` (what the adapter calls) wraps the same reply in a list.
    status, _, raw = server.call("POST", "/", {**ASK, "stream": False})
    assert status == 200 and shape(json.loads(raw)) == [json.dumps(shape(fix["body"]),
                                                                     sort_keys=True)]


def test_generate_stream_is_tgis_stream(server: Server) -> None:
    fix = fixture("generate_stream.json")
    want = sse_events(fix["body"])
    status, headers, raw = server.call("POST", "/generate_stream", ASK)
    assert status == 200
    for name in ("content-type", "x-compute-type", "x-compute-characters", "x-accel-buffering"):
        assert headers[name].startswith(fix["headers"][name]) or name.startswith("x-compute")
    events = sse_events(raw)
    *tokens, last = events
    assert tokens, raw
    for event in tokens:
        assert shape(event) == shape(want[0]), event
    assert shape(last) == shape(want[-1])
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] > 0
    # Without details the last event carries `details: null`, as TGI's own capture shows.
    plain = {"inputs": "Test request", "parameters": {"max_new_tokens": 4}}
    status, _, raw = server.call("POST", "/generate_stream", plain)
    final = sse_events(raw)[-1]
    assert shape(final) == shape(sse_events(fixture(
        "generate_stream_final_no_details.json")["body"])[-1])


# TGI's message, with its figures as groups (router/src/validation.rs, MaxTotalTokens).
TOO_LONG = re.compile(
    re.escape(fixture("error_422_validation.json")["body"]["error"])
    .replace("1024", r"(\d+)").replace("900", r"(\d+)").replace("200", r"(\d+)") + "$")


def _too_long() -> dict[str, Any]:
    # About 700 tokens (within --max-input-tokens), plus 400 new: over 1024.
    return {"inputs": "hello " * 700, "parameters": {"max_new_tokens": 400}}


def test_422_is_tgis_validation_error(server: Server) -> None:
    fix = fixture("error_422_validation.json")
    status, headers, raw = server.call("POST", "/generate", _too_long())
    assert status == fix["status"] and headers["content-type"].startswith("application/json")
    body = json.loads(raw)
    assert shape(body) == shape(fix["body"]) and body["error_type"] == "validation"
    match = TOO_LONG.match(body["error"])
    assert match, body["error"]
    limit, inputs, new = map(int, match.groups())
    assert (limit, new) == (MAX_TOTAL, 400) and 600 <= inputs <= MAX_INPUT


def test_stream_validation_error_is_one_event_after_a_200(server: Server) -> None:
    fix = fixture("generate_stream_error_validation.json")
    status, headers, raw = server.call("POST", "/generate_stream", _too_long())
    assert status == fix["status"] == 200
    assert headers["content-type"].startswith("text/event-stream")
    (event,) = sse_events(raw)
    (want,) = sse_events(fix["body"])
    assert shape(event) == shape(want) and event["error_type"] == want["error_type"]
    assert TOO_LONG.match(event["error"]), event["error"]


def test_429_is_tgis_overloaded_error(server: Server) -> None:
    """--max-concurrent-requests 1: a second request while a stream runs."""
    fix = fixture("error_429_overloaded.json")
    if server.name == "double":  # it echoes at once: slow it down
        server.call("POST", "/_control", {"token_delay": 0.05})
    # A counting prompt keeps a small model going rather than stopping early.
    body = json.dumps({"inputs": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                       "parameters": {"max_new_tokens": 200}}).encode()
    request = urllib.request.Request(server.url + "/generate_stream", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as held:
            first = json.loads(held.readline()[len(b"data:"):])
            assert first["generated_text"] is None  # admitted, and still generating
            status, headers, raw = server.call("POST", "/generate", ASK)
    finally:
        server.call("POST", "/_control", {}) if server.name == "double" else None
    assert status == fix["status"] and headers["content-type"].startswith("application/json")
    assert json.loads(raw) == fix["body"]


def test_424_is_tgis_generation_error(double: Server) -> None:
    """Only the double can fail a generation on demand."""
    fix = fixture("error_424_generation.json")
    double.call("POST", "/_control", {"mode": "generation_error"})
    try:
        status, headers, raw = double.call("POST", "/generate", ASK)
    finally:
        double.call("POST", "/_control", {})
    assert status == fix["status"] and headers["content-type"].startswith("application/json")
    body = json.loads(raw)
    assert shape(body) == shape(fix["body"]) and body["error_type"] == "generation"
    assert body["error"].startswith("Request failed during generation: ")


def test_generation_error_midstream_is_tgis_event(double: Server) -> None:
    """After tokens have gone out, TGI sends the error as the last event:
    ErrorResponse, the 424's body (server.rs, impl From<InferError> for Event)."""
    want = fixture("error_424_generation.json")["body"]
    double.call("POST", "/_control", {"mode": "generation_error", "after_tokens": 2})
    try:
        status, _, raw = double.call("POST", "/generate_stream",
                                     {"inputs": "a b c d", "parameters": {"details": True}})
    finally:
        double.call("POST", "/_control", {})
    assert status == 200
    *tokens, last = sse_events(raw)
    assert len(tokens) == 2
    assert shape(last) == shape(want) and last["error_type"] == want["error_type"]
    assert last["error"].startswith("Request failed during generation: ")


def test_info_is_tgis(server: Server) -> None:
    want = fixture("info.json")["body"]
    status, _, raw = server.call("GET", "/info")
    assert status == 200
    info = json.loads(raw)
    assert list(info) == list(want)
    for key, value in want.items():
        if key in NULLABLE_INFO:
            assert info[key] is None or isinstance(info[key], str), (key, info[key])
        else:
            assert shape(info[key]) == shape(value), (key, info[key])
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (MAX_INPUT, MAX_TOTAL)
    assert info["max_concurrent_requests"] == 1
