"""The official `openai` SDK, sync and async, against the real processes:
`make up`'s entry point (adapters, router with its OpenAI listener, Envoy)
in front of two TGI doubles, with API keys on and two requests per model
admitted at once."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from tests.harness.fixtures import API_KEY
from tests.harness.mesh import Mesh
from tests.harness.parts import http_json
from tests.harness.wait import eventually

pytestmark = pytest.mark.integration

KEY = API_KEY
USER = [{"role": "user", "content": "Say hi to the mesh"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture
def mesh(secured: Mesh) -> Mesh:
    """The secured mesh: API keys on, two requests per model admitted at once
    (`clean` resets it before and after each test)."""
    return secured


@pytest.fixture
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def aclient(mesh: Mesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.http}/v1", api_key=KEY, max_retries=0, timeout=30)


def router_metrics(mesh: Mesh) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series `name` whose labels include `labels`."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- models --------------------------------------------------------------------


def test_models_list_and_retrieve(clean: Mesh, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen2", "llama3"]
    assert all(m.object == "model" and m.owned_by == "llmmesh" for m in models.data)
    qwen = client.models.retrieve("qwen2")
    assert qwen.id == "qwen2" and isinstance(qwen.created, int)
    assert qwen.model_extra["backend_model"] == "double/qwen2"
    assert client.models.retrieve("llama").id == "llama3"  # an alias


async def test_models_async(clean: Mesh, aclient: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in aclient.models.list()]
    assert ids == ["qwen2", "llama3"]
    assert (await aclient.models.retrieve("qwen2")).model_extra["name"] == (
        "Qwen2-7B-Instruct-GPTQ-Int4")


# -- generation ----------------------------------------------------------------


def test_chat(clean: Mesh, client: openai.OpenAI) -> None:
    before = router_metrics(clean)
    reply = client.chat.completions.create(model="qwen2", messages=USER, max_tokens=32)
    # The double echoes the last user turn of the prompt that the model's
    # chat template (applied in the adapter) made of the messages.
    assert reply.choices[0].message.content == "Say hi to the mesh"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "qwen2"
    assert reply.usage.completion_tokens == 6  # five words and the end-of-sequence token
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    body = clean.doubles["qwen2"].stats()["last_request"]["body"]
    assert "<|im_start|>user\nSay hi to the mesh<|im_end|>" in body["inputs"]
    assert body["parameters"]["max_new_tokens"] == 32
    # The native API's metrics and log lines count it.
    after = router_metrics(clean)
    labels = {"service": "router", "model": "qwen2", "method": "Generate", "code": "OK"}
    assert metric(after, "llmmesh_requests_total", **labels) == (
        metric(before, "llmmesh_requests_total", **labels) + 1)
    assert metric(after, "llmmesh_output_tokens_total", model="qwen2") >= 6
    log = [json.loads(line) for line in clean.log("router").splitlines() if '"openai"' in line]
    assert any(e.get("route") == "/v1/chat/completions" and e.get("code") == "OK" for e in log)


def test_chat_stream_with_usage(clean: Mesh, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="llama3", messages=USER, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Say hi to the mesh"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_chat_async_with_and_without_streaming(clean: Mesh,
                                                     aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(
        model="llama3", messages=[{"role": "system", "content": "Be kind."},
                                  {"role": "user", "content": [{"type": "text", "text": "one"},
                                                               {"type": "text", "text": "two"}]}])
    assert reply.choices[0].message.content == "one\ntwo"
    stream = await aclient.chat.completions.create(
        model="qwen", messages=USER, stream=True, max_completion_tokens=3)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Say hi to"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # not asked for


def test_events_pass_envoy_as_they_are_made(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(token_delay=0.3, reply="a b c d e")
    stream = client.chat.completions.create(model="qwen2", messages=USER, stream=True)
    arrivals = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # Nothing buffers the stream: the words arrive spread over the generation.
    assert arrivals[-1] - arrivals[0] > 0.8


def test_completions(clean: Mesh, client: openai.OpenAI) -> None:
    reply = client.completions.create(model="qwen2", prompt="one two three four", max_tokens=2)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "one two" and reply.choices[0].finish_reason == "length"
    # Raw: the prompt reaches the engine without a chat template.
    assert clean.doubles["qwen2"].stats()["last_request"]["body"]["inputs"] == (
        "one two three four")
    stream = client.completions.create(model="llama3", prompt="five six", stream=True)
    assert "".join(c.choices[0].text for c in stream) == "five six"


async def test_completions_async(clean: Mesh, aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.completions.create(model="llama3", prompt="seven eight")
    assert reply.choices[0].text == "seven eight"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_json_schema_reaches_tgi_as_its_grammar(clean: Mesh, client: openai.OpenAI) -> None:
    """The TGI double does not constrain its text; what matters here is that
    the schema arrives as TGI's `grammar` parameter (the CPU backend test
    checks the text itself)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    try:
        client.chat.completions.create(model="qwen2", messages=USER, response_format=fmt)
    except openai.BadRequestError as err:  # an engine without grammar support says so
        assert "grammar" in str(err.body["message"])
        assert err.body["param"] == "response_format"
    body = clean.doubles["qwen2"].stats()["last_request"]["body"]
    assert body["parameters"]["grammar"] == {"type": "json", "value": SCHEMA}
    try:
        client.chat.completions.create(
            model="llama3", messages=USER, response_format={"type": "json_object"})
    except openai.BadRequestError as err:
        assert "grammar" in str(err.body["message"])
    body = clean.doubles["llama3"].stats()["last_request"]["body"]
    assert body["parameters"]["grammar"] == {"type": "json", "value": {
        "type": "object", "properties": {}, "additionalProperties": True}}


# -- errors --------------------------------------------------------------------


def test_unknown_model_is_not_found(clean: Mesh, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert "qwen2, llama3" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert metric(router_metrics(clean), "llmmesh_errors_total",
                  model="unknown", reason="model_not_found") >= 2


async def test_bad_parameters_name_their_param(clean: Mesh, aclient: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await aclient.chat.completions.create(model="qwen2", messages=USER, n=9)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        await aclient.chat.completions.create(
            model="qwen2", messages=USER,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": 3}}}])
    assert err.value.body["param"] == "tools[0].function.parameters"
    # Refused by the adapter (TGI has no presence penalty), named in OpenAI's terms.
    with pytest.raises(openai.BadRequestError) as err:
        await aclient.chat.completions.create(model="qwen2", messages=USER,
                                              presence_penalty=0.5)
    assert err.value.body["param"] == "presence_penalty"
    assert err.value.response.headers["x-should-retry"] == "false"


def test_api_keys(clean: Mesh, client: openai.OpenAI) -> None:
    wrong = client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="qwen2", messages=USER)
    assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, _, body = http_json("GET", f"{clean.http}/v1/models")  # no key at all
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated"


def test_overload_is_a_rate_limit_with_retry_after(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(token_delay=0.2, reply=" ".join(["word"] * 100))
    held = [client.chat.completions.create(model="qwen2", messages=USER, stream=True)
            for _ in range(2)]  # the adapter admits two at once
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="qwen2", messages=USER)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "overloaded"
    finally:
        for stream in held:
            stream.close()


def test_model_down_is_a_server_error(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["llama3"].control(mode="unhealthy")
    eventually(lambda: not client.models.retrieve("llama3").model_extra["ready"], timeout=20)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="llama3", messages=USER)
    assert err.value.status_code == 503 and err.value.body["code"] == "model_unavailable"
    # The other model is untouched.
    assert client.chat.completions.create(model="qwen2", messages=USER).choices


def test_an_error_after_the_stream_started_is_raised(clean: Mesh, client: openai.OpenAI) -> None:
    clean.doubles["qwen2"].control(mode="die_midstream", after_tokens=3,
                                   reply="one two three four five six")
    stream = client.chat.completions.create(model="qwen2", messages=USER, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == "one two three"
    assert err.value.body["code"] == "incomplete_generation"


async def test_a_client_that_leaves_stops_the_generation(
    clean: Mesh, aclient: openai.AsyncOpenAI
) -> None:
    double = clean.doubles["llama3"]
    double.control(token_delay=0.1, reply=" ".join(["word"] * 200))
    stream = await aclient.chat.completions.create(model="llama3", messages=USER, stream=True,
                                                   max_tokens=200)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 2:
            break
    await stream.close()
    eventually(lambda: double.stats()["generations_cancelled"] == 1, timeout=10)
    stats = double.stats()
    assert stats["generations_active"] == 0 and stats["generations_completed"] == 0
    eventually(lambda: metric(router_metrics(clean), "llmmesh_errors_total",
                              model="llama3", reason="cancelled") >= 1, timeout=10)


def test_bodies_over_1_mib_are_refused_at_the_edge(clean: Mesh) -> None:
    big = json.dumps({"model": "qwen2", "messages": [
        {"role": "user", "content": "x" * (1024 * 1024 + 1)}]}).encode()
    started = time.monotonic()
    status, kind, body = http_json("POST", f"{clean.http}/v1/chat/completions", big,
                                   {"Authorization": f"Bearer {KEY}",
                                    "Content-Type": "application/json"})
    assert status == 413 and kind == "application/json"
    # Envoy's own reply, in OpenAI's shape on OpenAI's routes.
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert time.monotonic() - started < 10
    assert clean.doubles["qwen2"].stats()["requests"] == {}


def test_native_routes_are_unchanged(clean: Mesh) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    status, _, body = http_json("POST", f"{clean.http}/v1/generate",
                                json.dumps({"model_id": "qwen2", "inputs": "hello"}).encode(),
                                headers)
    assert status == 200 and json.loads(body)["generated_text"] == "hello"
    status, _, body = http_json("GET", f"{clean.http}/v1/mesh/models", headers=headers)
    assert status == 200 and "models" in json.loads(body)
