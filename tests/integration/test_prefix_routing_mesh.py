"""Cache-aware replica choice with real processes: two routers that share
nothing, over two adapters of one model whose engines (TGI doubles) keep a
prefix cache, send each conversation's turns to one engine, and the reused
prompt tokens reach clients on every face (native reply and final stream
event, OpenAI usage whole and streamed) and the routers' hit counters."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

import pytest
from llmmesh.v1 import generate_pb2 as pb

from tests.harness.parts import (
    AdapterPart,
    DoublePart,
    RouterPart,
    start_all,
    stop_all,
    stub,
)
from tests.harness.procs import free_port
from tests.harness.wait import eventually

MODEL = "qwen2"
_WORDS = "account balance cache channel client ledger policy quota region tenant token".split()


def system_prompt(c: int) -> str:
    rng = random.Random(c)
    return f"You are the assistant of company {c}. " + " ".join(
        rng.choice(_WORDS) for _ in range(400))


def messages(c: int, turns: int) -> list[pb.ChatMessage]:
    out = [pb.ChatMessage(role="system", content=system_prompt(c))]
    for t in range(turns):
        out.append(pb.ChatMessage(role="user", content=f"question {t} of conversation {c}"))
        if t < turns - 1:
            out.append(pb.ChatMessage(role="assistant", content=f"answer {t}"))
    return out


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("prefix-routing")
    cache = ("--prefix-cache-tokens", "65536")
    doubles = [DoublePart(f"double-{i}", tmp, *cache) for i in range(2)]
    adapters = [AdapterPart(f"adapter-{i}", tmp, MODEL, d) for i, d in enumerate(doubles)]
    addresses = {MODEL: [a.address for a in adapters]}
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    openai_port = free_port()
    metrics_port = free_port()
    one = RouterPart(tmp / "a", addresses, "--openai-port", str(openai_port),
                     "--metrics-port", str(metrics_port))
    two = RouterPart(tmp / "b", addresses)
    parts = [*doubles, *adapters, one, two]
    try:
        start_all(doubles)
        start_all(adapters)
        start_all([one, two])
        yield one, two, f"http://127.0.0.1:{openai_port}", metrics_port
    finally:
        stop_all(parts)


def idle(address: str) -> bool:
    """Whether the router sees no engine load on the model (reports are sampled:
    one taken during the previous turn makes its engine look busier for a while)."""
    model = stub(address).GetModel(pb.GetModelRequest(model_id=MODEL), timeout=5).model
    return model.load.waiting + model.load.running == 0


def test_two_routers_send_each_conversation_to_the_engine_holding_its_prefix(routers):
    one, two, _, metrics_port = routers
    stubs = [stub(one.address), stub(two.address)]
    for c in range(4):
        for t in range(4):
            # As between a user's turns: both routers see idle engines, so the
            # second router's choice is its own (consistent hashing), not load.
            eventually(lambda: idle(one.address) and idle(two.address), 10, "idle engines")
            router = stubs[t % 2]  # turns alternate between the routers
            reply = router.Generate(pb.GenerateRequest(
                model_id=MODEL, messages=messages(c, t + 1),
                parameters=pb.GenerationParameters(max_new_tokens=4)), timeout=30)
            assert reply.input_tokens > 400
            if t == 0:
                assert reply.cached_input_tokens < reply.input_tokens / 2, (c, t)
            else:  # the engine of the earlier turns holds all but the new question
                assert reply.cached_input_tokens >= 0.8 * reply.input_tokens, (c, t, reply)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("llmmesh_router_prefix_")}
    key = '{model="qwen2",service="router"}'
    assert series[f"llmmesh_router_prefix_requests_total{key}"] == 8
    # The first router saw turns 1 and 3: the third always matched its own index.
    assert series[f"llmmesh_router_prefix_hits_total{key}"] >= 4


def test_the_final_stream_event_says_the_reused_tokens(routers):
    one, *_ = routers
    c = 10
    request = pb.GenerateStreamRequest(model_id=MODEL, messages=messages(c, 1),
                                       parameters=pb.GenerationParameters(max_new_tokens=4))
    list(stub(one.address).GenerateStream(request, timeout=30))
    request = pb.GenerateStreamRequest(model_id=MODEL, messages=messages(c, 2),
                                       parameters=pb.GenerationParameters(max_new_tokens=4))
    events = list(stub(one.address).GenerateStream(request, timeout=30))
    final = events[-1]
    assert final.input_tokens > 400
    assert final.cached_input_tokens >= 0.8 * final.input_tokens
    assert all(e.cached_input_tokens == 0 for e in events[:-1])


def test_openai_usage_says_the_cached_prompt_tokens_whole_and_streamed(routers):
    _, _, openai, _ = routers
    c = 20
    history = [{"role": "system", "content": system_prompt(c)},
               {"role": "user", "content": "first question"}]

    def chat(**extra: object) -> dict:
        body = json.dumps({"model": MODEL, "messages": history, "max_tokens": 4, **extra})
        request = urllib.request.Request(f"{openai}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    first = chat()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < \
        first["usage"]["prompt_tokens"] / 2
    history += [first["choices"][0]["message"], {"role": "user", "content": "second"}]
    second = chat()["usage"]
    assert second["prompt_tokens_details"]["cached_tokens"] >= 0.8 * second["prompt_tokens"]
    history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "third"}]
    body = {"model": MODEL, "messages": history, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{openai}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        events = [json.loads(line[5:]) for line in resp
                  if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
    usage = events[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.8 * usage["prompt_tokens"]
