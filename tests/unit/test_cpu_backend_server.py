"""The TGI-compatible HTTP layer, exercised over HTTP with the scripted engine.

Everything here goes through a real socket (aiohttp's TestServer) and, where
it matters, through the real `text-generation` 0.7.0 client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from text_generation import AsyncClient
from text_generation.errors import (
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    ValidationError,
)

from services.cpu_backend.server import CORE, create_app
from services.cpu_backend.settings import ServerSettings
from tests.harness.wait import eventually_async
from tools.tgi_double import ScriptedEngine, create_double_app, parse_sse

pytestmark = pytest.mark.timeout(30)

SETTINGS = ServerSettings(
    model_id="test-model",
    max_concurrent_requests=2,
    max_input_tokens=32,
    max_total_tokens=160,
    disconnect_poll_interval=0.05,
)
CHATML = "<|im_start|>user\nHello big world<|im_end|>\n<|im_start|>assistant\n"
# Scripted tokenization: one token per whitespace-separated word.
CHATML_TOKENS = 5
VALIDATION = "validation"


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = create_double_app(ScriptedEngine(model_id="scripted"), SETTINGS)
    async with TestServer(app) as server, TestClient(server) as test_client:
        yield test_client


def engine_of(client: TestClient) -> ScriptedEngine:
    engine = client.app[CORE].engine
    assert isinstance(engine, ScriptedEngine)
    return engine


async def control(client: TestClient, **state: Any) -> None:
    resp = await client.post("/_control", json=state)
    assert resp.status == 200, await resp.text()


async def stats(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/_stats")
    return dict(await resp.json())


def base_url(client: TestClient) -> str:
    return str(client.server.make_url("/"))


# -- info, health, metrics, tokenize ---------------------------------------------


async def test_health_ping_and_root_are_200_with_empty_body(client: TestClient) -> None:
    for path in ("/health", "/ping", "/"):
        resp = await client.get(path)
        assert resp.status == 200
        assert await resp.read() == b""


async def test_unhealthy_engine_gives_503_healthcheck(client: TestClient) -> None:
    await control(client, mode="unhealthy")
    resp = await client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    await control(client)
    assert (await client.get("/health")).status == 200


async def test_draining_server_reports_unhealthy(client: TestClient) -> None:
    client.app[CORE].draining = True
    assert (await client.get("/health")).status == 503


async def test_info_has_tgi_v3_fields(client: TestClient) -> None:
    resp = await client.get("/info")
    assert resp.status == 200
    info = await resp.json()
    assert info == {
        "model_id": "test-model",
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": 2,
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_input_tokens": 32,
        "max_total_tokens": 160,
        "validation_workers": 1,
        "max_client_batch_size": 4,
        "router": "llmmesh-cpu-backend",
        "version": SETTINGS.version,
        "sha": None,
        "docker_label": None,
    }


async def test_v1_models_lists_the_served_model(client: TestClient) -> None:
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["test-model"]


async def test_tokenize_returns_tokens_with_spans(client: TestClient) -> None:
    resp = await client.post("/tokenize", json={"inputs": "Hello big world"})
    assert resp.status == 200
    assert await resp.json() == [
        {"id": 4157704578, "text": "Hello", "start": 0, "stop": 5},
        {"id": 2915847033, "text": " big", "start": 5, "stop": 9},
        {"id": 1245397707, "text": " world", "start": 9, "stop": 15},
    ]


async def test_metrics_use_tgi_names_in_a_private_registry(client: TestClient) -> None:
    await client.post("/generate", json={"inputs": "a b c"})
    await client.post("/generate", json={"inputs": "a", "parameters": {"top_k": 0}})
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    lines = set(text.splitlines())
    # TGI's exporter writes counters without `_total`.
    assert "tgi_request_count 2.0" in lines
    assert "tgi_request_success 1.0" in lines
    assert 'tgi_request_failure{err="validation"} 1.0' in lines
    assert 'tgi_request_failure{err="dropped"} 0.0' in lines
    for name in (
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_request_duration_count",
        "tgi_request_queue_duration_count",
        "tgi_request_inference_duration_count",
        "tgi_request_mean_time_per_token_duration_count",
        "tgi_request_validation_duration_count",
    ):
        assert any(line.startswith(name + " ") for line in lines), name
    assert "tgi_request_input_length_count 1.0" in lines
    assert "tgi_request_generated_tokens_sum 4.0" in lines  # a b c + EOS
    # Never the process-global registry: two apps in one process must coexist.
    assert REGISTRY.get_sample_value("tgi_request_count") is None
    create_app(ScriptedEngine(), SETTINGS)


# -- generation: shapes, headers, parameters ---------------------------------------


async def test_compat_route_returns_an_array_with_full_text_by_default(
    client: TestClient,
) -> None:
    resp = await client.post("/", json={"inputs": CHATML, "parameters": {"max_new_tokens": 10}})
    assert resp.status == 200
    body = await resp.json()
    # TGI defaults return_full_text to true on `/` for text-generation models.
    assert body == [{"generated_text": CHATML + "Hello big world"}]


async def test_compat_route_with_return_full_text_false(client: TestClient) -> None:
    payload = {"inputs": CHATML, "parameters": {"return_full_text": False}, "stream": False}
    body = await (await client.post("/", json=payload)).json()
    assert body == [{"generated_text": "Hello big world"}]


async def test_generate_returns_object_with_details_and_headers(client: TestClient) -> None:
    payload = {"inputs": CHATML, "parameters": {"details": True, "max_new_tokens": 10}}
    resp = await client.post("/generate", json=payload)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    body = await resp.json()
    assert body == {
        "generated_text": "Hello big world",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 4,
            "seed": None,
            "prefill": [],
            "tokens": [
                {"id": 4157704578, "text": "Hello", "logprob": -0.5, "special": False},
                {"id": 2915847033, "text": " big", "logprob": -0.5, "special": False},
                {"id": 1245397707, "text": " world", "logprob": -0.5, "special": False},
                {"id": 0, "text": "</s>", "logprob": -0.1, "special": True},
            ],
        },
    }
    h = resp.headers
    assert h["x-prompt-tokens"] == str(CHATML_TOKENS)
    assert h["x-generated-tokens"] == "4"
    assert h["x-compute-type"] == "cpu"
    assert h["x-compute-characters"] == str(len(CHATML))
    for name in (
        "x-total-time",
        "x-inference-time",
        "x-queue-time",
        "x-time-per-token",
        "x-validation-time",
    ):
        assert int(h[name]) >= 0, name
    assert float(h["x-compute-time"]) > 0


async def test_generate_without_details_has_no_details_key(client: TestClient) -> None:
    body = await (await client.post("/generate", json={"inputs": "one two"})).json()
    assert body == {"generated_text": "one two"}


async def test_omitted_parameters_mean_100_new_tokens(client: TestClient) -> None:
    await control(client, reply=" ".join(["w"] * 300))
    resp = await client.post("/generate", json={"inputs": "hi"})
    assert resp.headers["x-generated-tokens"] == "100"
    # `parameters` present but without max_new_tokens: serde's default, 100 too.
    payload = {"inputs": "hi", "parameters": {"details": True}}
    details = (await (await client.post("/generate", json=payload)).json())["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 100
    # do_sample is false here (seed hidden) but true when parameters are omitted.
    assert details["seed"] is None


async def test_null_max_new_tokens_fills_the_total_budget(client: TestClient) -> None:
    await control(client, reply=" ".join(["w"] * 200))
    prompt = "one two three four five six seven eight"
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": None, "details": True}}
    body = await (await client.post("/generate", json=payload)).json()
    assert body["details"]["generated_tokens"] == 160 - 8
    assert body["details"]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("parameters", "text", "finish_reason", "count"),
    [
        ({"max_new_tokens": 2}, "Hello big", "length", 2),
        ({"stop": ["big"]}, "Hello big", "stop_sequence", 2),
        # A stop sequence inside a token still stops (TGI matches on text).
        ({"stop": ["orl"]}, "Hello big world", "stop_sequence", 3),
        ({"stop": ["absent"]}, "Hello big world", "eos_token", 4),
        # Length wins over EOS when both happen on the same token, as in TGI.
        ({"max_new_tokens": 4}, "Hello big world", "length", 4),
    ],
)
async def test_finish_reasons(
    client: TestClient, parameters: dict, text: str, finish_reason: str, count: int
) -> None:
    payload = {"inputs": CHATML, "parameters": {**parameters, "details": True}}
    body = await (await client.post("/generate", json=payload)).json()
    assert body["generated_text"] == text
    assert body["details"]["finish_reason"] == finish_reason
    assert body["details"]["generated_tokens"] == count


async def test_stop_sequence_closes_the_engine_early(client: TestClient) -> None:
    await client.post("/generate", json={"inputs": CHATML, "parameters": {"stop": ["big"]}})
    s = await stats(client)
    assert s["generations_closed_early"] == 1
    assert s["generations_active"] == 0


@pytest.mark.parametrize(
    ("parameters", "seeded"),
    [
        ({}, False),
        ({"do_sample": True, "seed": 42}, True),
        ({"temperature": 0.5}, True),  # any warper turns sampling on, as in TGI
        ({"repetition_penalty": 1.2}, False),
    ],
)
async def test_seed_reported_only_when_sampling(
    client: TestClient, parameters: dict, seeded: bool
) -> None:
    payload = {"inputs": "a", "parameters": {**parameters, "details": True}}
    seed = (await (await client.post("/generate", json=payload)).json())["details"]["seed"]
    if parameters.get("seed") is not None:
        assert seed == parameters["seed"]
    assert (seed is not None) == seeded


async def test_decoder_input_details_returns_prefill_tokens(client: TestClient) -> None:
    payload = {"inputs": "Hello big", "parameters": {"decoder_input_details": True}}
    body = await (await client.post("/generate", json=payload)).json()
    assert body["details"]["prefill"] == [
        {"id": 4157704578, "text": "Hello", "logprob": None},
        {"id": 2915847033, "text": " big", "logprob": None},
    ]


async def test_truncate_keeps_the_end_of_the_prompt(client: TestClient) -> None:
    payload = {"inputs": "a b c d e", "parameters": {"truncate": 2}}
    resp = await client.post("/generate", json=payload)
    assert resp.headers["x-prompt-tokens"] == "2"
    assert await resp.json() == {"generated_text": "d e"}


# -- streaming ---------------------------------------------------------------------


async def test_sse_framing_is_byte_exact(client: TestClient) -> None:
    await control(client, reply="Hi there")
    payload = {"inputs": "x y z", "parameters": {"details": True, "max_new_tokens": 5}}
    resp = await client.post("/generate_stream", json=payload)
    assert resp.status == 200
    assert await resp.read() == (
        b'data:{"index":1,"token":{"id":1293356558,"text":"Hi","logprob":-0.5,'
        b'"special":false},"generated_text":null,"details":null}\n\n'
        b'data:{"index":2,"token":{"id":711178782,"text":" there","logprob":-0.5,'
        b'"special":false},"generated_text":null,"details":null}\n\n'
        b'data:{"index":3,"token":{"id":0,"text":"</s>","logprob":-0.1,"special":true},'
        b'"generated_text":"Hi there","details":{"finish_reason":"eos_token",'
        b'"generated_tokens":3,"seed":null,"input_length":3}}\n\n'
    )


async def test_stream_headers_match_tgi(client: TestClient) -> None:
    resp = await client.post("/generate_stream", json={"inputs": "a b"})
    await resp.read()
    h = resp.headers
    assert h["Content-Type"] == "text/event-stream"
    assert h["Cache-Control"] == "no-cache"
    assert h["X-Accel-Buffering"] == "no"
    assert h["x-compute-type"] == "cpu"
    # Token counts are unknown when the headers leave; TGI sends none either.
    assert "x-prompt-tokens" not in h


async def test_compat_route_streams_when_asked(client: TestClient) -> None:
    resp = await client.post("/", json={"inputs": CHATML, "stream": True})
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = parse_sse(await resp.read())
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    # return_full_text defaults to true on `/`, details to false.
    assert events[-1]["generated_text"] == CHATML + "Hello big world"
    assert events[-1]["details"] is None
    assert all(e["generated_text"] is None for e in events[:-1])


async def test_stream_tokens_arrive_before_the_end(client: TestClient) -> None:
    await control(client, token_delay=0.15)
    started = time.monotonic()
    async with client.post("/generate_stream", json={"inputs": "a b c d"}) as resp:
        first = await resp.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        rest = await resp.read()
    total = time.monotonic() - started
    assert json.loads(first[len(b"data:") :])["token"]["text"] == "a"
    assert first_at < total - 0.3
    assert len(parse_sse(rest)) == 4


async def test_idle_stream_gets_keep_alive_comments() -> None:
    settings = ServerSettings(model_id="m", keep_alive_interval=0.1)
    app = create_double_app(ScriptedEngine(), settings)
    async with TestServer(app) as server, TestClient(server) as ka:
        await control(ka, first_token_delay=0.45)
        raw = await (await ka.post("/generate_stream", json={"inputs": "a"})).read()
    assert raw.startswith(b":\n\n:\n\n")
    assert [e["token"]["text"] for e in parse_sse(raw)] == ["a", "</s>"]


# -- validation --------------------------------------------------------------------

LONG_PROMPT = " ".join(["w"] * 40)
TEN_WORDS = " ".join(["w"] * 10)

VALIDATION_CASES = [
    ({"inputs": "a", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
    (
        {"inputs": "a", "parameters": {"temperature": -1.0}},
        "`temperature` must be strictly positive",
    ),
    ({"inputs": "a", "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
    ({"inputs": "a", "parameters": {"top_p": 0.0}}, "`top_p` must be > 0.0 and < 1.0"),
    # Rounded to f32 like TGI, 0.999999999 is 1.0 and rejected.
    ({"inputs": "a", "parameters": {"top_p": 0.999999999}}, "`top_p` must be > 0.0 and < 1.0"),
    ({"inputs": "a", "parameters": {"top_k": 0}}, "`top_k` must be strictly positive"),
    ({"inputs": "a", "parameters": {"typical_p": 1.0}}, "`typical_p` must be > 0.0 and < 1.0"),
    (
        {"inputs": "a", "parameters": {"max_new_tokens": 0}},
        "`max_new_tokens` must be strictly positive",
    ),
    (
        {"inputs": "a", "parameters": {"repetition_penalty": 0}},
        "`repetition_penalty` must be strictly positive",
    ),
    (
        {"inputs": "a", "parameters": {"frequency_penalty": 2.5}},
        "`frequency_penalty` must be >= -2.0 and <= 2.0",
    ),
    (
        {"inputs": "a", "parameters": {"stop": ["1", "2", "3", "4", "5"]}},
        "`stop` supports up to 4 stop sequences. Given: 5",
    ),
    ({"inputs": ""}, "`inputs` cannot be empty"),
    (
        {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 1}},
        "`inputs` must have less than 32 tokens. Given: 40",
    ),
    (
        {"inputs": TEN_WORDS, "parameters": {"max_new_tokens": 151}},
        "`inputs` tokens + `max_new_tokens` must be <= 160. "
        "Given: 10 `inputs` tokens and 151 `max_new_tokens`",
    ),
    (
        {"inputs": "a", "parameters": {"top_n_tokens": 6}},
        "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
    ),
    (
        {"inputs": "a", "parameters": {"truncate": 0}},
        "`truncate` must be strictly positive and less than 32. Given: 0",
    ),
    (
        {"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": "(a)\\1"}}},
        "grammar is not valid: regex: backreferences are not supported",
    ),
    (
        {"inputs": "a", "parameters": {"grammar": {"type": "json", "value": 3}}},
        "grammar is not supported",
    ),
    (
        {"inputs": "a", "parameters": {"grammar": {"type": "json", "value": {"type": "object"}}}},
        "grammar is not valid: Grammar must have a 'properties' field",
    ),
    (
        {"inputs": "a", "parameters": {"grammar": {"type": "json", "value": "{not json"}}},
        "grammar is not valid: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
    ),
    (
        {"inputs": "a", "parameters": {"best_of": 2}},
        "you must use sampling when `best_of` is > 1",
    ),
]


@pytest.mark.parametrize(("payload", "message"), VALIDATION_CASES)
async def test_validation_errors_are_422_and_never_reach_the_engine(
    client: TestClient, payload: dict, message: str
) -> None:
    resp = await client.post("/generate", json=payload)
    assert resp.status == 422
    assert await resp.json() == {
        "error": f"Input validation error: {message}",
        "error_type": VALIDATION,
    }
    s = await stats(client)
    assert s["generations_started"] == 0
    assert s["failures"]["validation"] == 1
    assert s["in_flight"] == 0


@pytest.mark.parametrize(("payload", "message"), VALIDATION_CASES[:4])
async def test_validation_errors_on_streams_are_in_band(
    client: TestClient, payload: dict, message: str
) -> None:
    # TGI has sent 200 and the SSE headers before it validates.
    resp = await client.post("/generate_stream", json=payload)
    assert resp.status == 200
    expected = {"error": f"Input validation error: {message}", "error_type": VALIDATION}
    assert await resp.read() == b"data:" + json.dumps(expected, separators=(",", ":")).encode() + (
        b"\n\n"
    )


@pytest.mark.parametrize(
    ("route", "parameters", "message"),
    [
        ("/generate", {"best_of": 3}, "`best_of` must be > 0 and <= 2. Given: 3"),
        (
            "/generate_stream",
            {"best_of": 2},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            "/generate_stream",
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
async def test_checks_made_before_admission(
    client: TestClient, route: str, parameters: dict, message: str
) -> None:
    # Even when every permit is taken, these answer with validation, not 429.
    await control(client, mode="overloaded")
    resp = await client.post(route, json={"inputs": "a", "parameters": parameters})
    raw = await resp.read()
    expected = {"error": f"Input validation error: {message}", "error_type": VALIDATION}
    if route == "/generate":
        assert resp.status == 422
        assert json.loads(raw) == expected
    else:
        assert parse_sse(raw) == [expected]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "Failed to parse the request body as JSON: "),
        (b'{"inputs": NaN}', "application/json", 400, "Failed to parse the request body as JSON"),
        (
            b'{"inputs": 3}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: inputs: invalid type: "
            "integer `3`, expected a string",
        ),
        (
            b'{"parameters": {}}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: missing field `inputs`",
        ),
        (
            b'{"inputs": "a", "parameters": {"max_new_tokens": -1}}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: "
            "parameters.max_new_tokens: invalid value: integer `-1`, expected u32",
        ),
        (
            b'{"inputs": "a", "parameters": {"stop": null}}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: "
            "parameters.stop: invalid type: null, expected a sequence",
        ),
        (
            b'{"inputs": "a"}',
            "text/plain",
            415,
            "Expected request with `Content-Type: application/json`",
        ),
    ],
)
async def test_unreadable_bodies_are_rejected_like_axum(
    client: TestClient, body: bytes, content_type: str, status: int, message: str
) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        resp = await client.post(route, data=body, headers={"Content-Type": content_type})
        assert resp.status == status
        payload = await resp.json()
        assert payload["error"].startswith(message)
        assert payload["error_type"] == VALIDATION
    s = await stats(client)
    # The extractor fails before TGI's handler: nothing counted, nothing generated.
    assert s["request_count"] == 0
    assert s["generations_started"] == 0


async def test_oversized_body_is_413(client: TestClient) -> None:
    body = json.dumps({"inputs": "a" * (SETTINGS.payload_limit + 10)})
    resp = await client.post("/generate", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error_type"] == VALIDATION


# -- overload ----------------------------------------------------------------------

OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}


async def test_requests_beyond_the_limit_get_429_at_once(client: TestClient) -> None:
    await control(client, mode="hang", after_tokens=1)
    streams = [await client.post("/generate_stream", json={"inputs": "a b c"}) for _ in range(2)]
    for resp in streams:  # both admitted and generating
        await resp.content.readuntil(b"\n\n")
    started = time.monotonic()
    resp = await client.post("/generate", json={"inputs": "a"})
    assert resp.status == 429
    assert await resp.json() == OVERLOADED
    assert time.monotonic() - started < 1.0
    # On a stream the overload error is in-band after a 200, as in TGI.
    resp = await client.post("/generate_stream", json={"inputs": "a"})
    assert resp.status == 200
    assert parse_sse(await resp.read()) == [OVERLOADED]
    for resp in streams:
        resp.close()
    await eventually_async(lambda: _in_flight_is(client, 0))
    await control(client)
    assert (await client.post("/generate", json={"inputs": "a"})).status == 200
    s = await stats(client)
    assert s["failures"]["overloaded"] == 2
    assert s["dropped"] == 2


async def _in_flight_is(client: TestClient, value: int) -> bool:
    return (await stats(client))["in_flight"] == value


async def test_overloaded_mode_forces_429(client: TestClient) -> None:
    await control(client, mode="overloaded")
    resp = await client.post("/", json={"inputs": "a"})
    assert resp.status == 429
    assert await resp.json() == OVERLOADED
    assert (await stats(client))["generations_started"] == 0


# -- generation faults -------------------------------------------------------------


async def test_generation_error_is_424(client: TestClient) -> None:
    await control(client, mode="generation_error")
    resp = await client.post("/generate", json={"inputs": "a b"})
    assert resp.status == 424
    assert await resp.json() == {
        "error": "Request failed during generation: scripted generation error",
        "error_type": "generation",
    }
    assert (await stats(client))["failures"]["generation"] == 1


async def test_generation_error_mid_stream_is_in_band(client: TestClient) -> None:
    await control(client, mode="generation_error", after_tokens=2)
    resp = await client.post("/generate_stream", json={"inputs": "a b c d"})
    events = parse_sse(await resp.read())
    assert [e["token"]["text"] for e in events[:2]] == ["a", " b"]
    assert events[2] == {
        "error": "Request failed during generation: scripted generation error",
        "error_type": "generation",
    }
    assert len(events) == 3


async def test_engine_ending_early_is_incomplete_generation(client: TestClient) -> None:
    await control(client, mode="incomplete", after_tokens=1)
    resp = await client.post("/generate", json={"inputs": "a b c"})
    assert resp.status == 500
    assert await resp.json() == {
        "error": "Incomplete generation",
        "error_type": "incomplete_generation",
    }


async def test_incomplete_stream_ends_without_final_event(client: TestClient) -> None:
    await control(client, mode="incomplete", after_tokens=2)
    resp = await client.post("/generate_stream", json={"inputs": "a b c d"})
    events = parse_sse(await resp.read())  # a clean end of body: no exception
    assert [e["token"]["text"] for e in events] == ["a", " b"]
    assert all(e["generated_text"] is None for e in events)


async def test_die_midstream_drops_the_connection(client: TestClient) -> None:
    await control(client, mode="die_midstream", after_tokens=1)
    resp = await client.post("/generate_stream", json={"inputs": "a b c"})
    first = await resp.content.readuntil(b"\n\n")
    assert b'"text":"a"' in first
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await eventually_async(lambda: _in_flight_is(client, 0))


async def test_die_midstream_on_unary_gives_no_response(client: TestClient) -> None:
    await control(client, mode="die_midstream")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/generate", json={"inputs": "a b"})


# -- client disconnects ------------------------------------------------------------


async def test_stream_disconnect_cancels_generation(client: TestClient) -> None:
    await control(client, token_delay=0.05, reply=" ".join(["w"] * 40))
    resp = await client.post("/generate_stream", json={"inputs": "a"})
    await resp.content.readuntil(b"\n\n")
    await resp.content.readuntil(b"\n\n")
    resp.close()

    async def cancelled() -> bool:
        s = await stats(client)
        return s["generations_cancelled"] == 1 and s["generations_active"] == 0

    await eventually_async(cancelled)
    s = await stats(client)
    assert s["dropped"] == 1
    assert s["in_flight"] == 0
    assert s["success_count"] == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'tgi_request_failure{err="dropped"} 1.0' in metrics


async def test_unary_disconnect_cancels_generation(client: TestClient) -> None:
    await control(client, mode="hang")
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/generate", json={"inputs": "a"}, timeout=aiohttp.ClientTimeout(total=0.3)
        )

    async def cancelled() -> bool:
        s = await stats(client)
        return s["generations_cancelled"] == 1 and s["in_flight"] == 0

    await eventually_async(cancelled)
    assert (await stats(client))["dropped"] == 1


@pytest.mark.parametrize(
    "state",
    [
        {"mode": "hang"},
        # Busy: tokens keep coming for 1.5 s, so the loop is never idle.
        {"token_delay": 0.01, "reply": " ".join(["w"] * 150)},
    ],
)
async def test_disconnect_is_noticed_without_handler_cancellation(state: dict) -> None:
    # Hosted with aiohttp's default (handlers NOT cancelled on disconnect),
    # the app still notices by watching its transport.
    engine = ScriptedEngine()
    app = create_double_app(engine, SETTINGS)
    runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        await _post_control(url, state)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(
                    url + "/generate",
                    json={"inputs": "a", "parameters": {"max_new_tokens": 150}},
                    timeout=aiohttp.ClientTimeout(total=0.3),
                )

        async def cancelled() -> bool:
            return engine.stats.generations_cancelled == 1 and app[CORE].limiter.in_use == 0

        await eventually_async(cancelled, timeout=1.0)
        assert app[CORE].metrics.failures()["dropped"] == 1
        assert engine.stats.generations_completed == 0
    finally:
        await runner.cleanup()


async def _post_control(url: str, state: dict) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/_control", json=state)
        assert resp.status == 200


# -- the real text-generation client ------------------------------------------------


async def test_text_generation_client_generate(client: TestClient) -> None:
    tgi = AsyncClient(base_url(client))
    response = await tgi.generate(CHATML, max_new_tokens=10)
    assert response.generated_text == "Hello big world"
    assert response.details.finish_reason == "eos_token"
    assert response.details.generated_tokens == 4
    # The client posts to the bare URL, i.e. the compat route `/`.
    assert (await stats(client))["requests"] == {"POST /": 1}


async def test_text_generation_client_generate_stream(client: TestClient) -> None:
    tgi = AsyncClient(base_url(client))
    events = [e async for e in tgi.generate_stream(CHATML, max_new_tokens=2)]
    assert [e.token.text for e in events] == ["Hello", " big"]
    assert events[-1].generated_text == "Hello big"
    assert events[-1].details.finish_reason == "length"
    assert events[-1].details.generated_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("state", "kwargs", "error"),
    [
        # Over max_total_tokens: only the server can tell (the client checks > 0).
        ({}, {"max_new_tokens": 1000}, ValidationError),
        ({"mode": "overloaded"}, {}, OverloadedError),
        ({"mode": "generation_error"}, {}, GenerationError),
    ],
)
async def test_text_generation_client_maps_errors(
    client: TestClient, stream: bool, state: dict, kwargs: dict, error: type[Exception]
) -> None:
    await control(client, **state)
    tgi = AsyncClient(base_url(client))
    with pytest.raises(error):
        if stream:
            async for _ in tgi.generate_stream("a b", **kwargs):
                pass
        else:
            await tgi.generate("a b", **kwargs)


async def test_text_generation_client_sees_incomplete_generation(client: TestClient) -> None:
    await control(client, mode="incomplete", after_tokens=1)
    with pytest.raises(IncompleteGenerationError):
        await AsyncClient(base_url(client)).generate("a b c")


# -- processes ---------------------------------------------------------------------


# -- best_of and top_n_tokens ------------------------------------------------------


async def test_best_of_runs_sequences_side_by_side_and_lists_the_others(
    client: TestClient,
) -> None:
    payload = {
        "inputs": CHATML,
        "parameters": {"best_of": 2, "do_sample": True, "details": True, "max_new_tokens": 10},
    }
    resp = await client.post("/generate", json=payload)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["generated_text"] == "Hello big world"
    details = body["details"]
    (other,) = details["best_of_sequences"]
    assert list(other) == [
        "generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens",
    ]  # fmt: skip
    assert other["seed"] != details["seed"]
    s = await stats(client)
    assert s["generations_started"] == 2
    assert s["in_flight"] == 0


async def test_best_of_takes_one_permit_per_sequence(client: TestClient) -> None:
    payload = {"inputs": CHATML, "parameters": {"best_of": 2, "do_sample": True}}
    client.app[CORE].limiter.capacity = 1
    resp = await client.post("/generate", json=payload)
    assert resp.status == 429
    assert (await stats(client))["in_flight"] == 0
