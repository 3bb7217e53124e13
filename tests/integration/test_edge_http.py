"""The HTTP/JSON edge: the guide's curl examples, SSE streaming and every
error as JSON with the right status, through a real Envoy."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.mesh import Mesh
from tests.harness.procs import ROOT, free_port, start, stop, wait_http

pytestmark = pytest.mark.integration

# The guide's requests (steps 4 and 6), verbatim.
GUIDE = {
    "qwen2 greeting": """{
    "model_id": "qwen2",
    "inputs": "你好",
    "parameters": {
      "max_new_tokens": 64,
      "temperature": 0.7,
      "top_p": 0.9
    }
  }""",
    "llama3 greeting": """{
    "model_id": "llama3",
    "inputs": "Hello, how are you?",
    "parameters": {
      "max_new_tokens": 64
    }
  }""",
    "qa": """{
    "model_id": "llama3",
    "inputs": "光合作用的原理是什么？",
    "scenario": "qa",
    "parameters": {
      "max_new_tokens": 128,
      "temperature": 0.5
    }
  }""",
    "summarize": """{
    "model_id": "qwen2",
    "inputs": "人工智能是计算机科学的一个分支，旨在创建能够执行通常需要人类智能的任务的系统……",
    "scenario": "summarize",
    "parameters": {
      "max_new_tokens": 100
    }
  }""",
    "rewrite": """{
    "model_id": "llama3",
    "inputs": "这个产品非常好，大家都很喜欢。",
    "scenario": "rewrite",
    "parameters": {
      "max_new_tokens": 64,
      "temperature": 0.9
    }
  }""",
}
NAMES = {"qwen2": "Qwen2-7B-Instruct-GPTQ-Int4", "llama3": "Llama-3.1-8B-Instruct-GPTQ-INT4"}
SCENARIOS = {
    name: scenario["user"]
    for name, scenario in yaml.safe_load(
        (ROOT / "services" / "router" / "scenarios.yaml").read_text(encoding="utf-8")
    )["scenarios"].items()
}
WORDS = re.compile(r"\s*\S+")  # the TGI double's tokens (tools/tgi_double.py)


def curl(url: str, body: str, *headers: str) -> tuple[int, str, str]:
    """The guide's curl command line: returns (status, content type, body)."""
    args = ["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json",
            "-d", body, "-w", "\n%{http_code} %{content_type}"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    text, _, tail = out.rpartition("\n")
    status, _, ctype = tail.partition(" ")
    return int(status), ctype, text


def post(url: str, body: bytes | str, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, str, Any]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers["content-type"], json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers["content-type"], json.loads(err.read())


def get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers["content-type"], json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers["content-type"], json.loads(err.read())


@pytest.mark.parametrize("name", GUIDE)
def test_guide_curl_examples(mesh: Mesh, name: str) -> None:
    status, ctype, text = curl(f"{mesh.http}/v1/generate", GUIDE[name])
    assert status == 200, text
    assert ctype == "application/json"
    reply = json.loads(text)
    request = json.loads(GUIDE[name])
    # The double echoes the last user turn: the scenario's user message.
    user = SCENARIOS.get(request.get("scenario", "chat"), "{inputs}")
    echo = user.replace("{inputs}", request["inputs"])
    assert reply == {
        "generated_text": echo,
        "model": NAMES[request["model_id"]],
        "tokens": len(WORDS.findall(echo)) + 1,  # the double: a token per word, then EOS
        "input_tokens": reply["input_tokens"],
        "finish_reason": "FINISH_REASON_EOS_TOKEN",
        "model_id": request["model_id"],
        "tool_calls": [],  # unary replies print every field, empty ones too
        "logprobs": [],  # unary replies carry every field; none asked for
        "cached_input_tokens": 0,  # the double keeps no prefix cache here
    }
    assert reply["input_tokens"] > len(WORDS.findall(echo))  # the chat template's tokens too


def test_models_routes(mesh: Mesh) -> None:
    status, ctype, body = get(f"{mesh.http}/v1/mesh/models")
    assert (status, ctype) == (200, "application/json")
    assert [m["id"] for m in body["models"]] == ["qwen2", "llama3"]
    assert all(m["ready"] for m in body["models"])
    status, _, body = get(f"{mesh.http}/v1/mesh/models/llama")
    assert status == 200 and body["model"]["name"] == NAMES["llama3"]
    status, ctype, body = get(f"{mesh.http}/v1/mesh/models/nope")
    assert (status, ctype) == (404, "application/json") and "known models" in body["message"]


def read_sse(url: str, body: dict[str, Any]) -> tuple[str, list[tuple[float, dict[str, Any]]]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    events = []
    with urllib.request.urlopen(request, timeout=30) as resp:
        ctype = resp.headers["content-type"]
        for line in resp:
            if line.startswith(b"data:"):
                events.append((time.monotonic(), json.loads(line[5:])))
    return ctype, events


def test_stream_is_sse_and_not_buffered(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(token_delay=0.15)
    ctype, events = read_sse(f"{clean.http}/v1/generate_stream",
                             {"model_id": "qwen2", "inputs": "one two three four five"})
    assert ctype == "text/event-stream"
    # A token event carries its token and the count so far, nothing else.
    assert [e for _, e in events[:-1]] == [
        {"text": text, "tokens": i + 1}
        for i, text in enumerate(["one", " two", " three", " four", " five"])
    ]
    # Each event arrived when its token was made, not all at the end.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events[:-1])]
    assert all(gap > 0.08 for gap in gaps), gaps
    last = events[-1][1]
    assert last["finish_reason"] == "FINISH_REASON_EOS_TOKEN"
    assert (last["tokens"], last["generated_text"]) == (6, "one two three four five")
    assert last["input_tokens"] > 0 and last["model"] == NAMES["qwen2"]


def test_stream_error_midway_is_a_final_event(clean: Mesh) -> None:
    clean.doubles["llama3"].control(mode="generation_error", after_tokens=2)
    ctype, events = read_sse(f"{clean.http}/v1/generate_stream",
                             {"model_id": "llama3", "inputs": "a b c d"})
    assert ctype == "text/event-stream"
    assert "".join(e["text"] for _, e in events[:-1]) == "a b"
    last = events[-1][1]
    assert last["finish_reason"] == "FINISH_REASON_ERROR"
    assert last["error"]["code"] == "INTERNAL" and last["error"]["reason"] == "MODEL_ERROR"


def test_stream_error_before_start_is_a_status(clean: Mesh) -> None:
    status, ctype, body = post(f"{clean.http}/v1/generate_stream",
                               json.dumps({"model_id": "nope", "inputs": "x"}))
    assert (status, ctype) == (404, "application/json")
    assert body["details"][0]["reason"] == "MODEL_NOT_FOUND"


def _detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(d for d in body["details"] if d["@type"].endswith(kind))


def test_400_names_the_fields(clean: Mesh) -> None:
    status, ctype, body = post(f"{clean.http}/v1/generate", json.dumps({
        "model_id": "qwen2", "inputs": "hi",
        "parameters": {"temperature": 0, "top_p": 1.5, "max_new_tokens": 0}}))
    assert (status, ctype) == (400, "application/json")
    assert body["code"] == 3
    fields = [v["field"] for v in _detail(body, "BadRequest")["field_violations"]]
    assert fields == ["parameters.max_new_tokens", "parameters.temperature", "parameters.top_p"]
    assert _detail(body, "ErrorInfo")["reason"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"this is not json", "Unexpected token"),
        (b'{"model_id": "qwen2", "inputs": ', "Unexpected end"),
        (b'{"model_id": "qwen2", "inputs": 5}', "inputs"),
        (b'{"model_id": "qwen2", "inputs": "x", "parameters": {"max_new_tokens": "lots"}}',
         "max_new_tokens"),
    ],
)
def test_bad_json_is_400_json(mesh: Mesh, body: bytes, needle: str) -> None:
    status, ctype, reply = post(f"{mesh.http}/v1/generate", body)
    assert (status, ctype) == (400, "application/json")
    assert needle in reply["message"] and reply["code"] == 3
    assert _detail(reply, "ErrorInfo")["reason"] == "INVALID_ARGUMENT"


def test_unknown_route_and_model_are_404(mesh: Mesh) -> None:
    status, ctype, body = post(f"{mesh.http}/v1/mesh/nope", "{}")
    assert (status, ctype) == (404, "application/json") and body["code"] == 5
    assert body["message"] == "no such route: POST /v1/mesh/nope"
    info = _detail(body, "ErrorInfo")
    assert (info["reason"], info["domain"]) == ("ROUTE_NOT_FOUND", "llmmesh.v1")
    assert info["metadata"] == {"method": "POST", "path": "/v1/mesh/nope"}
    # Every other path under /v1/ is OpenAI's namespace: OpenAI's 404.
    status, ctype, body = post(f"{mesh.http}/v1/nope", "{}")
    assert status == 404 and ctype.startswith("application/json")
    assert body["error"]["code"] == "route_not_found"
    assert "POST /v1/generate" in body["error"]["message"]
    status, ctype, body = post(f"{mesh.http}/v1/generate",
                               json.dumps({"model_id": "gpt-4", "inputs": "x"}))
    assert (status, ctype) == (404, "application/json")
    assert "qwen2" in body["message"] and "llama3" in body["message"]


def test_headers_too_large_is_431_json(mesh: Mesh) -> None:
    args = ["curl", "-s", "-X", "POST", f"{mesh.http}/v1/generate", "-H", "x-pad: " + "a" * 70_000,
            "-d", "{}", "-w", "\n%{http_code} %{content_type}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    text, _, tail = out.rpartition("\n")
    assert tail == "431 application/json", out[-300:]
    body = json.loads(text)
    assert body["code"] == 8 and body["message"].startswith("request headers too large")
    assert _detail(body, "ErrorInfo")["reason"] == "REQUEST_TOO_LARGE"


def test_overloaded_is_429(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="overloaded")
    status, ctype, body = post(f"{clean.http}/v1/generate",
                               json.dumps({"model_id": "qwen2", "inputs": "x"}))
    assert (status, ctype) == (429, "application/json")
    assert _detail(body, "ErrorInfo")["reason"] == "OVERLOADED"


def test_model_error_is_500(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="generation_error")
    status, _, body = post(f"{clean.http}/v1/generate",
                           json.dumps({"model_id": "qwen2", "inputs": "x"}))
    assert status == 500 and _detail(body, "ErrorInfo")["reason"] == "MODEL_ERROR"


def test_model_down_is_503(clean: Mesh) -> None:
    clean.doubles["llama3"].control(mode="unhealthy")
    deadline = time.monotonic() + 10
    status, ctype, body = 0, "", {}
    while time.monotonic() < deadline:
        status, ctype, body = post(f"{clean.http}/v1/generate",
                                   json.dumps({"model_id": "llama3", "inputs": "x"}))
        if status == 503:
            break
        time.sleep(0.2)
    assert (status, ctype) == (503, "application/json")
    assert _detail(body, "ErrorInfo")["reason"] in ("MODEL_UNAVAILABLE", "BACKEND_UNAVAILABLE")


def test_timeout_is_504(clean: Mesh) -> None:
    clean.doubles["qwen2"].control(mode="hang")
    started = time.monotonic()
    status, ctype, body = post(f"{clean.http}/v1/generate",
                               json.dumps({"model_id": "qwen2", "inputs": "x"}),
                               headers={"grpc-timeout": "1S"})
    assert (status, ctype) == (504, "application/json")
    assert body["code"] == 4 and time.monotonic() - started < 5


def test_router_down_is_503_json(tmp_path: Path) -> None:
    """An Envoy whose router is not there answers 503 with a JSON body."""
    sys.path.insert(0, str(ROOT / "envoy"))
    import render  # envoy/render.py

    port, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(render.render(
        LISTEN_PORT=port, ADMIN_PORT=admin, ROUTER_PORT=free_port(),
        DESCRIPTOR=ROOT / "gen" / "llmmesh.binpb"))
    envoy = start([str(Path(sys.executable).parent / "envoy"), "-c", str(config),
                   "--disable-hot-restart", "--log-level", "warn"],
                  log_path=tmp_path / "envoy.log")
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", 20, envoy)
        status, ctype, body = post(f"http://127.0.0.1:{port}/v1/generate",
                                   json.dumps({"model_id": "qwen2", "inputs": "x"}))
        assert (status, ctype) == (503, "application/json")
        assert body["code"] == 14
        assert body["message"].startswith("the router cannot be reached: "), body
        assert _detail(body, "ErrorInfo")["reason"] == "ROUTER_UNAVAILABLE"
    finally:
        stop(envoy)


def test_test_api_script_passes(mesh: Mesh) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "test_api.py"), "--base-url", mesh.http],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
