#!/usr/bin/env python3
"""Exercise the mesh's HTTP API the way the deployment guide describes.

    python scripts/test_api.py [--base-url http://localhost:8000]

Sends the guide's requests (the qwen2 and llama3 greetings, then the qa,
summarize and rewrite scenarios), a streamed request and a few bad ones,
checks every answer, prints a line per check and exits non-zero when any
check fails. Standard library only, so it runs from any machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

GUIDE_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("qwen2 greeting", {
        "model_id": "qwen2", "inputs": "你好",
        "parameters": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9},
    }),
    ("llama3 greeting", {
        "model_id": "llama3", "inputs": "Hello, how are you?",
        "parameters": {"max_new_tokens": 64},
    }),
    ("qa", {
        "model_id": "llama3", "inputs": "光合作用的原理是什么？", "scenario": "qa",
        "parameters": {"max_new_tokens": 128, "temperature": 0.5},
    }),
    ("summarize", {
        "model_id": "qwen2",
        "inputs": "人工智能是计算机科学的一个分支，旨在创建能够执行通常需要人类智能的任务的系统……",
        "scenario": "summarize", "parameters": {"max_new_tokens": 100},
    }),
    ("rewrite", {
        "model_id": "llama3", "inputs": "这个产品非常好，大家都很喜欢。", "scenario": "rewrite",
        "parameters": {"max_new_tokens": 64, "temperature": 0.9},
    }),
]

MODEL_NAMES = {
    "qwen2": "Qwen2-7B-Instruct-GPTQ-Int4",
    "llama3": "Llama-3.1-8B-Instruct-GPTQ-INT4",
}


def post(url: str, body: bytes, timeout: float) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


class Checks:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def run(self, name: str, check: Callable[[], str]) -> None:
        started = time.perf_counter()
        try:
            detail = check()
        except Exception as exc:  # every failure is reported, then the next check runs
            self.failed += 1
            print(f"FAIL {name}: {exc}")
            return
        self.passed += 1
        print(f"ok   {name} ({(time.perf_counter() - started) * 1000:.0f} ms) {detail}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_generate(base: str, body: dict[str, Any], timeout: float) -> str:
    status, ctype, raw = post(f"{base}/v1/generate", json.dumps(body).encode(), timeout)
    expect(status == 200, f"status {status}: {raw[:300]!r}")
    expect(ctype.startswith("application/json"), f"content type {ctype}")
    reply = json.loads(raw)
    expect(isinstance(reply.get("generated_text"), str) and reply["generated_text"].strip() != "",
           f"empty generated_text: {reply}")
    expect(reply.get("model") == MODEL_NAMES[body["model_id"]], f"model {reply.get('model')}")
    max_new = body.get("parameters", {}).get("max_new_tokens", 1 << 30)
    expect(isinstance(reply.get("tokens"), int) and 0 < reply["tokens"] <= max_new,
           f"tokens {reply.get('tokens')}")
    text = reply["generated_text"].replace("\n", " ")
    return f"tokens={reply['tokens']} text={text[:60]!r}"


def check_stream(base: str, timeout: float) -> str:
    body = json.dumps({"model_id": "qwen2", "inputs": "Count from one to five.",
                       "parameters": {"max_new_tokens": 32}}).encode()
    request = urllib.request.Request(
        f"{base}/v1/generate_stream", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        expect(resp.headers.get("content-type", "").startswith("text/event-stream"),
               f"content type {resp.headers.get('content-type')}")
        for line in resp:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    expect(len(events) >= 2, f"{len(events)} events")
    last = events[-1]
    expect(last.get("finish_reason") not in (None, "FINISH_REASON_UNSPECIFIED",
                                             "FINISH_REASON_ERROR"), f"last event {last}")
    text = "".join(e.get("text", "") for e in events[:-1])
    expect(text == last.get("generated_text"), "chunks do not add up to generated_text")
    return f"events={len(events)} tokens={last.get('tokens')}"


def check_error(base: str, body: bytes, status: int, timeout: float,
                path: str = "/v1/generate") -> str:
    got, ctype, raw = post(f"{base}{path}", body, timeout)
    expect(got == status, f"status {got}, want {status}: {raw[:300]!r}")
    expect(ctype.startswith("application/json"), f"content type {ctype}")
    reply = json.loads(raw)
    expect(isinstance(reply.get("message"), str) and reply["message"], f"no message: {reply}")
    reasons = [d.get("reason") for d in reply.get("details", [])
               if str(d.get("@type", "")).endswith("google.rpc.ErrorInfo")]
    expect(len(reasons) == 1 and reasons[0], f"no ErrorInfo: {reply}")
    return f"{got} {reasons[0]} {reply['message'][:60]!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:8000")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = parser.parse_args()
    base, timeout = args.base_url.rstrip("/"), args.timeout
    checks = Checks()
    for name, body in GUIDE_REQUESTS:
        checks.run(name, functools.partial(check_generate, base, body, timeout))
    checks.run("stream", lambda: check_stream(base, timeout))
    bad: list[tuple[str, dict[str, Any], int]] = [
        ("unknown model -> 404", {"model_id": "gpt-4", "inputs": "hi"}, 404),
        ("top_p = 1.0 -> 400", {"model_id": "qwen2", "inputs": "hi",
                                "parameters": {"top_p": 1.0}}, 400),
        ("empty inputs -> 400", {"model_id": "qwen2", "inputs": ""}, 400),
        ("unknown scenario -> 400", {"model_id": "qwen2", "inputs": "hi",
                                     "scenario": "poem"}, 400),
    ]
    for name, bad_body, status in bad:
        checks.run(name, functools.partial(check_error, base, json.dumps(bad_body).encode(),
                                           status, timeout))
    checks.run("body that is not JSON -> 400",
               lambda: check_error(base, b"this is not json", 400, timeout))
    checks.run("unknown route -> 404",
               lambda: check_error(base, b"{}", 404, timeout, path="/v1/mesh/nope"))
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
