"""Models served by OpenAI-compatible engines, through the whole mesh.

qwen2 runs on llama-cpp-python's own OpenAI-compatible server (the real
program, `python -m llama_cpp.server`, with SmolLM2), llama3 on the vLLM
double (tools/vllm_double.py, vLLM's HTTP shapes from its source);
adapters (`--engine llamacpp` / `--engine vllm`), router and Envoy are the
real processes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from llmmesh.v1 import generate_pb2 as pb

from tests.harness.engine_parts import (
    VLLM_MODEL,
    EngineAdapterPart,
    LlamaServerPart,
    VLLMPart,
    gguf,
)
from tests.harness.parts import (
    NOT_SERVING,
    EnvoyPart,
    Part,
    RouterPart,
    error_details,
    health_status,
    http_json,
    ready_replicas,
    sse_events,
    start_all,
    start_edge,
    stop_all,
    stub,
)
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration


@dataclass
class EngineMesh:
    llama: LlamaServerPart
    vllm: VLLMPart
    adapters: dict[str, EngineAdapterPart]
    router: RouterPart
    envoy: EnvoyPart

    @property
    def http(self) -> str:
        return self.envoy.http


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineMesh]:
    tmp = tmp_path_factory.mktemp("engines")
    llama = LlamaServerPart(tmp)
    vllm = VLLMPart(tmp, "vllm", "--max-model-len", "256", "--max-num-seqs", "4")
    start_all([llama, vllm])
    adapters = {
        # SmolLM2 stands in for Qwen2: its own chat template, from the GGUF.
        "qwen2": EngineAdapterPart(tmp, "adapter-qwen2", "qwen2", "--engine", "llamacpp",
                                   "--engine-url", llama.url, "--chat-template", str(gguf())),
        "llama3": EngineAdapterPart(tmp, "adapter-llama3", "llama3", "--engine", "vllm",
                                    "--engine-url", f"{vllm.url}/v1"),
    }
    start_all(list(adapters.values()))
    router, envoy = start_edge(tmp, {m: [a.address] for m, a in adapters.items()})
    parts = [llama, vllm, *adapters.values(), router, envoy]
    try:
        yield EngineMesh(llama, vllm, adapters, router, envoy)
    finally:
        stop_all(parts)


def post(mesh: EngineMesh, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, raw = http_json("POST", f"{mesh.http}{path}", json.dumps(body).encode(),
                               {"Content-Type": "application/json"}, timeout=120)
    return status, json.loads(raw)


def test_the_guides_requests_on_llama_cpp_and_vllm(mesh: EngineMesh) -> None:
    status, reply = post(mesh, "/v1/generate", {
        "model_id": "qwen2", "inputs": "你好",
        "parameters": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9}})
    assert status == 200, reply
    assert reply["model"] == "Qwen2-7B-Instruct-GPTQ-Int4" and reply["model_id"] == "qwen2"
    assert reply["generated_text"] and 0 < reply["tokens"] <= 64
    assert reply["input_tokens"] > 0  # llama.cpp's usage
    assert reply["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS_TOKEN")

    status, reply = post(mesh, "/v1/generate", {
        "model_id": "llama3", "inputs": "Hello, how are you?",
        "parameters": {"max_new_tokens": 64}})
    assert status == 200, reply
    # The vLLM double echoes the last user turn of the Llama 3 prompt the
    # adapter rendered: the mesh's template reached /v1/completions.
    assert reply["generated_text"] == "Hello, how are you?"
    assert (reply["tokens"], reply["finish_reason"]) == (4, "FINISH_REASON_EOS_TOKEN")
    sent = mesh.vllm.stats()["last_body"]
    assert sent["model"] == VLLM_MODEL  # found on the engine's /v1/models
    assert "<|start_header_id|>user<|end_header_id|>" in sent["prompt"]

    status, reply = post(mesh, "/v1/generate", {
        "model_id": "llama3", "inputs": "光合作用的原理是什么？", "scenario": "qa",
        "parameters": {"max_new_tokens": 128, "temperature": 0.5}})
    assert status == 200, reply
    assert reply["generated_text"] == "光合作用的原理是什么？"
    sent = mesh.vllm.stats()["last_body"]
    assert "You are a knowledgeable assistant." in sent["prompt"]  # the qa scenario's system
    assert sent["temperature"] == 0.5


def test_the_engines_model_and_limits(mesh: EngineMesh) -> None:
    status, _, raw = http_json("GET", f"{mesh.http}/v1/mesh/models/llama3")
    model = json.loads(raw)["model"]
    assert status == 200 and model["backend_model"] == VLLM_MODEL
    assert model["max_total_tokens"] == 256  # vLLM's max_model_len
    status, _, raw = http_json("GET", f"{mesh.http}/v1/mesh/models/qwen2")
    model = json.loads(raw)["model"]
    assert model["backend_model"].endswith(".gguf")  # llama.cpp lists the GGUF path
    assert model["ready"] and "load" not in model  # llama.cpp's server has no /metrics


def test_streaming_from_llama_cpp(mesh: EngineMesh) -> None:
    events = list(sse_events(f"{mesh.http}/v1/generate_stream", {
        "model_id": "qwen2", "inputs": "Name three colors.",
        "parameters": {"max_new_tokens": 24, "do_sample": False}}, timeout=120))
    assert len(events) > 2, events
    last = events[-1]
    assert last["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS_TOKEN")
    assert last["generated_text"] == "".join(e["text"] for e in events[:-1])
    assert last["tokens"] == events[-2]["tokens"] > 0


def test_engine_refusals_are_the_meshs_errors(mesh: EngineMesh) -> None:
    # A prompt over llama.cpp's 2,048-token context: its 400, the mesh's 400.
    status, reply = post(mesh, "/v1/generate", {
        "model_id": "qwen2", "inputs": "word " * 2100, "scenario": "raw",
        "parameters": {"max_new_tokens": 4}})
    assert status == 400, reply
    assert "maximum context length is 2048" in reply["message"]
    assert reply["details"][0]["reason"] == "INVALID_ARGUMENT"
    # A grammar llama.cpp cannot follow is refused before it is sent.
    status, reply = post(mesh, "/v1/generate", {
        "model_id": "qwen2", "inputs": "x", "parameters": {"grammar": {"regex": "[0-9]+"}}})
    assert status == 400
    assert "parameters.grammar.regex" in reply["message"]
    # Bad parameters never reach the engine.
    status, reply = post(mesh, "/v1/generate", {
        "model_id": "qwen2", "inputs": "x", "parameters": {"top_p": 1.0}})
    assert status == 400 and "parameters.top_p" in reply["message"]


def test_structured_output_on_llama_cpp(mesh: EngineMesh) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string"}},
              "required": ["color"]}
    status, reply = post(mesh, "/v1/generate", {
        "model_id": "qwen2", "inputs": "Name a color, as JSON.",
        "parameters": {"max_new_tokens": 48, "grammar": {"json_schema": schema}}})
    assert status == 200, reply
    if reply["finish_reason"] == "FINISH_REASON_EOS_TOKEN":
        assert isinstance(json.loads(reply["generated_text"])["color"], str)
    else:  # cut at max_new_tokens: still the grammar's prefix
        assert reply["generated_text"].lstrip().startswith('{')


@pytest.mark.parametrize(("status", "http", "reason"), [
    (429, 429, "OVERLOADED"), (500, 500, "MODEL_ERROR"), (503, 503, "BACKEND_UNAVAILABLE")])
def test_vllm_errors_through_envoy(mesh: EngineMesh, status: int, http: int, reason: str) -> None:
    mesh.vllm.control(status=status)
    try:
        got, reply = post(mesh, "/v1/generate", {"model_id": "llama3", "inputs": "hi"})
    finally:
        mesh.vllm.control()
        # An engine's 503 marks the replica down until the router's next health round.
        eventually(lambda: ready_replicas(mesh.router.address, "llama3") == 1)
    assert got == http, reply
    assert reply["details"][0]["reason"] == reason
    assert reply["details"][0]["metadata"]["backend_status"] == str(status)


def test_vllm_error_midstream_ends_the_stream_in_band(mesh: EngineMesh) -> None:
    mesh.vllm.control(mode="error_midstream", after_tokens=2)
    try:
        events = list(sse_events(f"{mesh.http}/v1/generate_stream", {
            "model_id": "llama3", "inputs": "one two three four five",
            "parameters": {"max_new_tokens": 16}}))
    finally:
        mesh.vllm.control()
    assert "".join(e["text"] for e in events[:-1]) == "one two"
    assert events[-1]["finish_reason"] == "FINISH_REASON_ERROR"
    assert events[-1]["error"]["reason"] == "MODEL_ERROR"


def test_a_client_that_goes_away_cancels_the_engine_request(mesh: EngineMesh) -> None:
    mesh.vllm.control(token_delay=0.1)
    try:
        before = mesh.vllm.stats()["cancelled"]
        call = stub(mesh.router.address).GenerateStream(pb.GenerateStreamRequest(
            model_id="llama3", inputs=" ".join(["word"] * 60),
            parameters=pb.GenerationParameters(max_new_tokens=100)), timeout=60)
        first = next(iter(call))
        assert first.text
        call.cancel()
        eventually(lambda: mesh.vllm.stats()["cancelled"] == before + 1, timeout=10)
        eventually(lambda: mesh.vllm.stats()["running"] == 0, timeout=10)
    finally:
        mesh.vllm.control()


def test_a_client_that_goes_away_stops_llama_cpp(mesh: EngineMesh) -> None:
    def disconnects() -> int:
        return mesh.llama.tail(100_000).count("Disconnected from client")

    before = disconnects()
    call = stub(mesh.router.address).GenerateStream(pb.GenerateStreamRequest(
        model_id="qwen2", inputs="Write a long story about the sea.",
        parameters=pb.GenerationParameters(max_new_tokens=1500)), timeout=300)
    assert next(iter(call)).text
    call.cancel()
    # llama-cpp-python's server notices the closed connection and stops.
    eventually(lambda: disconnects() == before + 1, timeout=30)
    reply = stub(mesh.router.address).Generate(pb.GenerateRequest(
        model_id="qwen2", inputs="Hi", parameters=pb.GenerationParameters(max_new_tokens=4)),
        timeout=60)
    assert reply.tokens > 0


def test_the_engines_load_reaches_the_router(mesh: EngineMesh) -> None:
    mesh.vllm.control(token_delay=0.2)
    stop = threading.Event()

    def hold() -> None:  # requests that reach vLLM without the mesh
        body = {"model": VLLM_MODEL, "prompt": "a b c d e f g h i j", "max_tokens": 20}
        request = urllib.request.Request(
            f"{mesh.vllm.url}/v1/completions", data=json.dumps(body).encode(), method="POST")
        while not stop.is_set():
            urllib.request.urlopen(request, timeout=30).close()

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        def load() -> dict[str, Any]:
            _, _, raw = http_json("GET", f"{mesh.http}/v1/mesh/models/llama3")
            return dict(json.loads(raw)["model"].get("load") or {})

        def saturated() -> bool:
            now = load()
            return (now.get("running"), now.get("kv_cache_usage")) == (4, 1.0) and (
                now.get("waiting", 0) >= 1)

        eventually(saturated, timeout=15)
    finally:
        stop.set()
        mesh.vllm.control()
        for t in threads:
            t.join(30)


def test_llama_cpp_killed_midstream(tmp_path: Path) -> None:
    server = LlamaServerPart(tmp_path, "llama-server-doomed")
    server.start(90)
    adapter = EngineAdapterPart(tmp_path, "adapter-doomed", "qwen2", "--engine", "llamacpp",
                                "--engine-url", server.url, "--chat-template", str(gguf()))
    try:
        adapter.start(60)
        call = stub(adapter.address).GenerateStream(pb.GenerateStreamRequest(
            model_id="qwen2", inputs="Write a long story about the sea.",
            parameters=pb.GenerationParameters(max_new_tokens=1000)), timeout=120)
        messages = iter(call)
        assert next(messages).text
        server.proc.kill()  # type: ignore[union-attr]
        started = time.monotonic()
        rest = list(messages)
        assert time.monotonic() - started < 10
        last = rest[-1]
        assert last.finish_reason == pb.FINISH_REASON_ERROR
        assert last.error.code == "UNAVAILABLE"
        assert last.error.reason in ("INCOMPLETE_GENERATION", "BACKEND_UNAVAILABLE")
        eventually(lambda: health_status(adapter.address) == NOT_SERVING, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub(adapter.address).Generate(
                pb.GenerateRequest(model_id="qwen2", inputs="hi"), timeout=10)
        assert error_details(err.value)["reason"] == "BACKEND_UNAVAILABLE"
    finally:
        stop_all([server, adapter])


def test_router_sends_requests_away_from_a_replica_loaded_from_outside(tmp_path: Path) -> None:
    quiet = VLLMPart(tmp_path, "vllm-quiet", "--max-num-seqs", "2")
    busy = VLLMPart(tmp_path, "vllm-busy", "--max-num-seqs", "2", "--token-delay", "0.2")
    start_all([quiet, busy])
    adapters = [
        EngineAdapterPart(tmp_path, f"adapter-{v.name}", "llama3", "--engine", "vllm",
                          "--engine-url", f"{v.url}/v1")
        for v in (quiet, busy)
    ]
    parts: list[Part] = [quiet, busy, *adapters]
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        start_all(adapters)
        router = RouterPart(tmp_path, {"llama3": [a.address for a in adapters]})
        router.start(60)
        parts.append(router)

        def hold() -> None:
            body = {"model": VLLM_MODEL, "prompt": "a b c d e f g h", "max_tokens": 20}
            request = urllib.request.Request(
                f"{busy.url}/v1/completions", data=json.dumps(body).encode(), method="POST")
            while not stop.is_set():
                urllib.request.urlopen(request, timeout=30).close()

        threads = [threading.Thread(target=hold, daemon=True) for _ in range(5)]
        for t in threads:
            t.start()
        eventually(lambda: busy.stats()["waiting"] >= 2, timeout=10)
        time.sleep(1.0)  # an adapter sample and a router health round
        before = {p.name: p.stats()["requests"] for p in (quiet, busy)}
        mesh = stub(router.address)
        for _ in range(6):
            reply = mesh.Generate(pb.GenerateRequest(model_id="llama3", inputs="hi"), timeout=30)
            assert reply.generated_text == "hi"
        after = {p.name: p.stats()["requests"] for p in (quiet, busy)}
        # Least-in-flight would alternate (3 and 3): the router saw the queue.
        assert after["vllm-quiet"] - before["vllm-quiet"] == 6
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        stop_all(parts)


def test_logprobs_and_n_from_vllm(mesh: EngineMesh) -> None:
    """llama3's logprobs are the vLLM double's own (tools/vllm_double.py gives
    each word the TGI double's values), read from vLLM's completions shape."""
    from tools.tgi_double import alternatives, piece_logprob

    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="none", max_retries=0,
                           timeout=60)
    words = ["Tea", " is", " a", " hot", " drink"]
    user = [{"role": "user", "content": "".join(words)}]
    reply = client.chat.completions.create(model="llama3", messages=user, logprobs=True,
                                           top_logprobs=3, max_tokens=16)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [(t.token, t.logprob) for t in content] == [(w, piece_logprob(w)) for w in words]
    assert [[(a.token, a.logprob) for a in t.top_logprobs] for t in content] == [
        [(a.text, a.logprob) for a in alternatives(w, 3)] for w in words]
    assert mesh.vllm.stats()["last_body"]["logprobs"] == 3  # the completions route's count
    streamed = [t for chunk in client.chat.completions.create(
        model="llama3", messages=user, logprobs=True, max_tokens=16, stream=True)
        for c in chunk.choices if c.logprobs is not None for t in c.logprobs.content or ()]
    assert [(t.token, t.logprob) for t in streamed] == [(w, piece_logprob(w)) for w in words]

    before = mesh.vllm.stats()["requests"]
    several = client.completions.create(model="llama3", prompt="".join(words), n=3,
                                        max_tokens=16, seed=5, temperature=0.5, logprobs=1)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert all(c.text == "".join(words) for c in several.choices)
    assert all(c.logprobs.token_logprobs == [piece_logprob(w) for w in words]  # type: ignore[union-attr]
               for c in several.choices)
    assert several.usage is not None and several.usage.completion_tokens == 3 * len(words)
    assert mesh.vllm.stats()["requests"] - before == 3


def test_input_tokens_are_counted_by_the_engine(mesh: EngineMesh) -> None:
    """CountTokens: vLLM's /tokenize counts the prompt as the generation's input;
    llama.cpp's adapter (no tokenizer route used) answers the stated bound."""
    import grpc
    from llmmesh.v1 import generate_pb2 as pb
    from llmmesh.v1 import generate_pb2_grpc as pb_grpc

    with grpc.insecure_channel(mesh.router.address) as channel:
        stub = pb_grpc.GenerateServiceStub(channel)
        for model, exact in (("llama3", True), ("qwen2", False)):
            request = pb.GenerateRequest(model_id=model, inputs="one two three four",
                                         parameters=pb.GenerationParameters(max_new_tokens=2))
            counted = stub.CountTokens(pb.CountTokensRequest(request=request), timeout=30)
            generated = stub.Generate(request, timeout=60)
            assert counted.exact is exact, model
            if exact:
                assert counted.input_tokens == generated.input_tokens > 0
            else:
                assert counted.input_tokens >= generated.input_tokens > 0
