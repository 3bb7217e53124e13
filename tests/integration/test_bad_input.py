"""Bad input against the real mesh: property-based (hypothesis) hostile values
for every field over gRPC (router) and HTTP (Envoy), raw and non-UTF-8 bodies,
deep nesting, and the size limits at Envoy and in gRPC.

Every case must get a 4xx / INVALID_ARGUMENT-class answer with a clear
message (or, when the values happen to be valid, a real reply), never a 5xx
and never a stack trace; and the mesh must serve the next good request.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmmesh.v1 import generate_pb2 as pb

from tests.harness.mesh import Mesh
from tests.harness.parts import error_details, http_json, stub

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
MIB = 1024 * 1024
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                              HealthCheck.data_too_large, HealthCheck.large_base_example],
    "database": None,  # the same examples every run, nothing written to disk
    "derandomize": True,
}
# The gRPC codes a client's own mistake may get; never INTERNAL, UNKNOWN, UNAVAILABLE...
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.OUT_OF_RANGE}
# HTTP status -> the gRPC code in Envoy's JSON error body.
HTTP_CODES = {400: 3, 404: 5, 413: 8, 429: 8, 431: 8}
LEAKS = ("Traceback", 'File "', "site-packages")

# -- strategies ---------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 1e308, -1e308, 5e-324, 0.999999999])
# Long texts are built from a length, so hypothesis need not generate them.
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n\t ", "\x00", "\u202e\u200b", "<|im_end|>", "{inputs}"]),
    st.integers(32_001, 40_000).map(lambda n: "x" * n),  # over the registry's 32000 chars
    st.integers(4_200, 6_000).map(lambda n: "w " * n),  # under it, over TGI's 4095 tokens
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(1, 12_000)),
)
MODEL_IDS = st.one_of(
    st.sampled_from(["qwen2", "llama3", "qwen", "LLAMA", "Qwen2-7B-Instruct-GPTQ-Int4",
                     " qwen2 ", "", "gpt-4", "qwen2\x00"]),
    st.text(max_size=30),
    st.integers(1_000, 100_000).map(lambda n: "m" * n),
)
SCENARIOS = st.one_of(
    st.sampled_from(["", "chat", "qa", "summarize", "rewrite", "raw", "RAW", "qa "]),
    st.text(max_size=30),
    st.integers(1_000, 50_000).map(lambda n: "s" * n),
)
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=12),
                  st.integers(100, 5_000).map(lambda n: "r" * n))


@st.composite
def grpc_parameters(draw: st.DrawFn) -> pb.GenerationParameters:
    out = pb.GenerationParameters(stop=draw(st.lists(st.text(max_size=12), max_size=8)))
    for name, values in (
        ("max_new_tokens", INT32), ("temperature", FLOATS), ("top_p", FLOATS),
        ("top_k", INT32), ("repetition_penalty", FLOATS),
        ("seed", st.integers(0, 2**64 - 1)), ("do_sample", st.booleans()),
    ):
        value = draw(st.none() | values)
        if value is not None:
            setattr(out, name, value)
    return out


@st.composite
def grpc_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model_id=draw(MODEL_IDS),
        inputs=draw(HOSTILE_TEXT),
        scenario=draw(SCENARIOS),
        parameters=draw(grpc_parameters()),
        messages=draw(st.one_of(
            st.just([]),
            st.lists(st.builds(pb.ChatMessage, role=ROLES, content=HOSTILE_TEXT), max_size=4),
            st.integers(60, 400).map(lambda n: [pb.ChatMessage(role="x", content="c")] * n),
        )),
    )


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "0x10", "", "null", "true"]),
)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)


def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: a plausible one (often hostile), or any JSON at all."""
    return st.one_of(good, good, JSON_ANY)


JSON_PARAMETERS = st.fixed_dictionaries({}, optional={
    "max_new_tokens": field(st.integers(-(2**40), 2**40)),
    "temperature": field(st.floats(allow_nan=False, allow_infinity=False)
                         | st.sampled_from(["NaN", "Infinity", "-Infinity"])),
    "top_p": field(st.floats(-2, 2)),
    "top_k": field(st.integers(-(2**33), 2**33)),
    "repetition_penalty": field(st.floats(-1e300, 1e300)),
    "stop": field(st.lists(st.text(max_size=8), max_size=8)),
    "seed": field(st.integers(-(2**65), 2**65)),
    "do_sample": field(st.booleans()),
})
JSON_BODIES = st.builds(
    lambda known, unknown: {**unknown, **known},
    st.fixed_dictionaries({}, optional={
        "model_id": field(MODEL_IDS),
        "inputs": field(HOSTILE_TEXT),
        "scenario": field(SCENARIOS),
        "parameters": field(JSON_PARAMETERS),
        "messages": field(st.lists(st.fixed_dictionaries({}, optional={
            "role": field(ROLES), "content": field(st.text(max_size=20))}), max_size=4)),
    }),
    st.dictionaries(st.text(max_size=10), JSON_ANY, max_size=2),
)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """A body whose JSON nests very deep, under a known or an unknown field."""
    depth = draw(st.integers(50, 20_000))
    opening, closing = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    deep = opening * depth + b"1" + closing * depth
    where = draw(st.sampled_from(["parameters", "messages", "unknown", "inputs"]))
    return b'{"model_id": "qwen2", "inputs": "x", "' + where.encode() + b'": ' + deep + b"}"


# -- checks -------------------------------------------------------------------------------


def good_grpc(mesh: Mesh) -> None:
    reply = stub(mesh.router).Generate(pb.GenerateRequest(model_id="qwen2", inputs="good"),
                                       timeout=10)
    assert reply.generated_text == "good"


def good_http(mesh: Mesh) -> None:
    status, _, raw = http_json("POST", f"{mesh.http}/v1/generate",
                               b'{"model_id": "llama3", "inputs": "good"}', JSON)
    assert status == 200 and json.loads(raw)["generated_text"] == "good", raw


def check_grpc_answer(call: Callable[[], Any]) -> grpc.RpcError | None:
    """A real reply, or a client-class status with a clear, short message."""
    try:
        call()
    except grpc.RpcError as exc:
        message = exc.details() or ""
        assert exc.code() in CLIENT_CODES, (exc.code(), message[:300])
        assert message and len(message) <= 1024, message[:300]
        assert not any(leak in message for leak in LEAKS), message
        assert error_details(exc)["reason"] in ("INVALID_ARGUMENT", "MODEL_NOT_FOUND")
        return exc
    return None


def check_http_answer(status: int, ctype: str, raw: bytes) -> dict[str, Any]:
    """200, or a 4xx with a JSON error body; never a 5xx or a stack trace."""
    assert status == 200 or status in HTTP_CODES, (status, raw[:300])
    assert ctype == "application/json", (status, ctype, raw[:300])
    assert not any(leak.encode() in raw for leak in LEAKS), raw[:500]
    body = json.loads(raw)
    if status != 200:
        assert body["code"] == HTTP_CODES[status], body
        assert isinstance(body["message"], str) and body["message"].strip(), body
    return dict(body)


# -- property tests -----------------------------------------------------------------------


@settings(max_examples=80, **SETTINGS)
@given(request=grpc_requests(), streaming=st.booleans())
def test_grpc_hostile_requests(mesh: Mesh, request: pb.GenerateRequest, streaming: bool) -> None:
    router = stub(mesh.router)
    if streaming:
        message = pb.GenerateStreamRequest()
        message.ParseFromString(request.SerializeToString())

        def call() -> None:
            replies = list(router.GenerateStream(message, timeout=15))
            # Bad input is refused before the stream starts, never in-band.
            assert replies[-1].finish_reason != pb.FINISH_REASON_ERROR, replies[-1]
    else:
        def call() -> None:
            assert router.Generate(request, timeout=15).model

    check_grpc_answer(call)
    good_grpc(mesh)


@settings(max_examples=25, **SETTINGS)
@given(model_id=MODEL_IDS)
def test_grpc_get_model_hostile_ids(mesh: Mesh, model_id: str) -> None:
    check_grpc_answer(lambda: stub(mesh.router).GetModel(
        pb.GetModelRequest(model_id=model_id), timeout=10))


@settings(max_examples=80, **SETTINGS)
@given(body=JSON_BODIES, path=st.sampled_from(["/v1/generate", "/v1/generate_stream"]),
       ascii_only=st.booleans())
def test_http_hostile_json(mesh: Mesh, body: dict[str, Any], path: str,
                           ascii_only: bool) -> None:
    raw = json.dumps(body, ensure_ascii=ascii_only).encode()
    status, ctype, reply = http_json("POST", f"{mesh.http}{path}", raw, JSON)
    if status == 200 and path.endswith("_stream"):
        assert ctype == "text/event-stream"
        assert b"FINISH_REASON_ERROR" not in reply, reply[-300:]
    else:
        check_http_answer(status, ctype, reply)
    good_http(mesh)


@settings(max_examples=40, **SETTINGS)
@given(raw=st.one_of(
    st.binary(max_size=300),
    # Non-UTF-8 bytes inside a JSON string, and in a key.
    st.binary(min_size=1, max_size=40).map(
        lambda b: b'{"model_id": "qwen2", "inputs": "' + b.replace(b'"', b"").replace(b"\\", b"")
        + b'\xff\xfe"}'),
    st.binary(min_size=1, max_size=20).map(
        lambda b: b'{"model_id\xc3\x28' + b.replace(b'"', b"") + b'": "qwen2"}'),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"1", b'"x"', b"{", b'{"model_id": NaN}',
                     b'{"model_id": "qwen2", "inputs": "x", "parameters": {"top_k": 1e999}}',
                     b'{"model_id": "qwen2", "model_id": "llama3", "inputs": "dup"}']),
))
def test_http_raw_and_non_utf8_bodies(mesh: Mesh, raw: bytes) -> None:
    check_http_answer(*http_json("POST", f"{mesh.http}/v1/generate", raw, JSON))
    good_http(mesh)


@settings(max_examples=15, **SETTINGS)
@given(raw=nested())
def test_http_deeply_nested_json(mesh: Mesh, raw: bytes) -> None:
    status, ctype, reply = http_json("POST", f"{mesh.http}/v1/generate", raw, JSON)
    check_http_answer(status, ctype, reply)
    assert status == 400, reply[:300]
    good_http(mesh)


@settings(max_examples=20, **SETTINGS)
@given(model_id=st.one_of(st.text(min_size=1, max_size=40),
                          st.integers(1_000, 8_000).map(lambda n: "m" * n)))
def test_http_get_model_hostile_ids(mesh: Mesh, model_id: str) -> None:
    path = urllib.parse.quote(model_id, safe="")
    check_http_answer(*http_json("GET", f"{mesh.http}/v1/mesh/models/{path}"))


# -- each kind of mistake, with its exact answer ------------------------------------------------

CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    # name: (body, HTTP status, text the message must contain)
    "unknown model": ({"model_id": "gpt-4", "inputs": "x"}, 404, "known models: qwen2, llama3"),
    "no model": ({"inputs": "x"}, 400, "model_id: is required"),
    "unknown scenario": ({"model_id": "qwen2", "inputs": "x", "scenario": "poem"}, 400,
                         "unknown scenario 'poem'"),
    "empty inputs": ({"model_id": "qwen2", "inputs": "  "}, 400, "inputs: must not be empty"),
    "inputs over the character limit": (
        {"model_id": "qwen2", "inputs": "x" * 32_001}, 400, "at most 32000 characters"),
    "inputs over the token limit": (
        {"model_id": "qwen2", "inputs": "w " * 5_000}, 400, "Input validation error"),
    "too many stop sequences": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"stop": list("abcde")}}, 400,
        "at most 4 stop sequences, got 5"),
    "NaN temperature": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"temperature": "NaN"}}, 400,
        "temperature: must be a number greater than 0, got nan"),
    "infinite top_p": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"top_p": "Infinity"}}, 400,
        "top_p: must be greater than 0 and less than 1, got inf"),
    "negative max_new_tokens": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"max_new_tokens": -5}}, 400,
        "max_new_tokens: must be between 1 and"),
    "max_new_tokens over int32": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"max_new_tokens": 2**31}}, 400,
        "max_new_tokens"),
    "negative seed": (
        {"model_id": "qwen2", "inputs": "x", "parameters": {"seed": -1}}, 400, "seed"),
    # Envoy's transcoder does not always name the field of a wrong type.
    "inputs of the wrong type": ({"model_id": "qwen2", "inputs": ["x"]}, 400, "not repeating"),
    "parameters of the wrong type": (
        {"model_id": "qwen2", "inputs": "x", "parameters": "hot"}, 400, "parameters"),
    "unknown role": (
        {"model_id": "qwen2", "messages": [{"role": "robot", "content": "x"}]}, 400,
        "messages[0].role: must be one of system, user, assistant, tool, got 'robot'"),
}


@pytest.mark.parametrize("name", CASES)
def test_each_mistake_over_http(mesh: Mesh, name: str) -> None:
    body, status, needle = CASES[name]
    answer = check_http_answer(*http_json("POST", f"{mesh.http}/v1/generate",
                                          json.dumps(body).encode(), JSON))
    assert answer["code"] == HTTP_CODES[status], answer
    assert needle in answer["message"], answer["message"]


def test_unknown_fields_are_ignored(mesh: Mesh) -> None:
    """Envoy's transcoder drops JSON fields the contract does not know (as
    proto3 JSON parsers do by default): a client built against a newer
    contract keeps working. It has no option to refuse them instead."""
    status, _, raw = http_json("POST", f"{mesh.http}/v1/generate", json.dumps({
        "model_id": "qwen2", "inputs": "x", "max_tokens": 5,
        "parameters": {"max_new_tokens": 3, "temprature": 0.5}}).encode(), JSON)
    assert status == 200 and json.loads(raw)["generated_text"] == "x"


# -- echoed values stay small: a status must fit in gRPC's 8 KiB of trailers ----------------


def test_long_values_are_clipped_in_errors(mesh: Mesh) -> None:
    router = stub(mesh.router)
    cases = [
        (pb.GenerateRequest(model_id="m" * 100_000, inputs="x"), grpc.StatusCode.NOT_FOUND,
         "known models: qwen2, llama3"),
        (pb.GenerateRequest(model_id="qwen2", inputs="x", scenario="界" * 50_000),
         grpc.StatusCode.INVALID_ARGUMENT, "(50000 characters)"),
        (pb.GenerateRequest(model_id="qwen2", messages=[
            pb.ChatMessage(role="r" * 100, content="x")] * 2_000),
         grpc.StatusCode.INVALID_ARGUMENT, "(2001 problems, the first 10 here)"),
    ]
    for request, code, needle in cases:
        error = check_grpc_answer(lambda r=request: router.Generate(r, timeout=10))
        assert error is not None and error.code() == code
        assert needle in (error.details() or ""), error.details()
    # (Not much longer: Envoy passes the path on as x-envoy-original-path, and
    # the router's gRPC server refuses metadata beyond 8 KiB, at random up to
    # 16 KiB, with RESOURCE_EXHAUSTED.)
    status, _, raw = http_json("GET", f"{mesh.http}/v1/mesh/models/{'m' * 4_000}")
    assert status == 404 and "known models" in json.loads(raw)["message"], raw[:300]
    status, _, raw = http_json("POST", f"{mesh.http}/v1/generate",
                               json.dumps({"model_id": "m" * 500_000, "inputs": "x"}).encode(),
                               JSON)
    assert status == 404 and len(raw) < 2_048, raw[:300]
    good_grpc(mesh)


# -- size limits --------------------------------------------------------------------------------


def test_body_over_one_mib_is_refused_by_envoy(mesh: Mesh, tmp_path: Path) -> None:
    # Valid apart from its size: the padding is an unknown field, which is dropped.
    body = json.dumps({"model_id": "qwen2", "inputs": "x", "pad": "p" * (MIB + MIB // 2)})
    status, ctype, raw = curl_post(f"{mesh.http}/v1/generate", body.encode(), tmp_path)
    assert (status, ctype) == (413, "application/json"), (status, raw[:200])
    answer = json.loads(raw)
    assert answer["code"] == 8 and "1 MiB" in answer["message"], answer
    assert [d["reason"] for d in answer["details"]] == ["REQUEST_TOO_LARGE"], answer
    good_http(mesh)


@pytest.mark.parametrize("size", [MIB + MIB // 2, 5 * MIB])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate_stream"])
def test_oversized_inputs_over_http_are_a_4xx(
    mesh: Mesh, tmp_path: Path, size: int, path: str
) -> None:
    """Refused whoever catches them first: Envoy's limit (413), the router's
    gRPC limit of 4 MiB (RESOURCE_EXHAUSTED: 429), or validation (400)."""
    body = json.dumps({"model_id": "qwen2", "inputs": "x" * size}).encode()
    status, ctype, raw = curl_post(f"{mesh.http}{path}", body, tmp_path)
    answer = check_http_answer(status, ctype, raw)
    assert status in ((400, 413) if size < 4 * MIB else (413, 429)), answer
    good_http(mesh)


def curl_post(url: str, body: bytes, tmp: Path) -> tuple[int, str, bytes]:
    """POST a large body with curl, which (unlike urllib) still reads an
    answer that comes before the whole body was sent, as a 413 does."""
    path = tmp / "body.json"
    path.write_bytes(body)
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json",
         "--data-binary", f"@{path}", "-w", "\n%{http_code} %{content_type}"],
        capture_output=True, timeout=60, check=True).stdout
    raw, _, tail = out.rpartition(b"\n")
    status, _, ctype = tail.decode().partition(" ")
    return int(status), ctype, raw


@pytest.mark.parametrize("where", ["router", "envoy"])
def test_grpc_message_limit_is_4_mib(mesh: Mesh, where: str) -> None:
    """Just under 4 MiB: parsed, then refused by validation. Just over: gRPC's
    own RESOURCE_EXHAUSTED, at the router (Envoy passes gRPC through)."""
    mesh_stub = stub(getattr(mesh, where))
    under = pb.GenerateRequest(model_id="qwen2", inputs="x" * (4 * MIB - 1_024))
    with pytest.raises(grpc.RpcError) as caught:
        mesh_stub.Generate(under, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 32000 characters" in (caught.value.details() or "")
    over = pb.GenerateRequest(model_id="qwen2", inputs="x" * (4 * MIB + 1_024))
    with pytest.raises(grpc.RpcError) as caught:
        mesh_stub.Generate(over, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or "")
    good_grpc(mesh)
