"""Logprobs and `n`: the OpenAI fields read, the engines' replies read, the
contract carried, and OpenAI's shapes written."""

from __future__ import annotations

from typing import Any

import pytest
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.engines.openai_compatible import OpenAICompatibleEngine, choice_logprobs
from services.adapter.engines.tgi import TGIEngine, _result, token_logprob
from services.common import pb_convert
from services.common.engine_kinds import KINDS
from services.common.errors import MeshError
from services.common.types import (
    Chunk,
    FinishReason,
    Generation,
    Message,
    Parameters,
    TokenLogprob,
)
from services.openai import responses
from services.openai.app import choice_requests
from services.openai.requests import openai_error, parse_chat, parse_completion

HELLO = TokenLogprob("Hello", -0.25, tuple(b"Hello"), (
    TokenLogprob("Hello", -0.25, tuple(b"Hello")), TokenLogprob("Hi", -1.5, tuple(b"Hi"))))
WORLD = TokenLogprob(" world", -0.5, tuple(b" world"), (
    TokenLogprob(" world", -0.5, tuple(b" world")), TokenLogprob(" there", -2.0, None)))


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "qwen2", "messages": [{"role": "user", "content": "Hi"}], **fields}


def generation(text: str = "Hello world", tokens: int = 2,
               logprobs: tuple[TokenLogprob, ...] = (HELLO, WORLD)) -> Generation:
    return Generation(text=text, model="M", model_id="qwen2", tokens=tokens, input_tokens=9,
                      finish_reason=FinishReason.EOS_TOKEN, logprobs=logprobs)


# -- reading the request ---------------------------------------------------------


def test_chat_logprobs_and_top_logprobs_become_parameters() -> None:
    params = parse_chat(chat(logprobs=True, top_logprobs=3)).generation.parameters
    assert (params.logprobs, params.top_logprobs, params.wants_logprobs) == (True, 3, True)
    params = parse_chat(chat(logprobs=True)).generation.parameters
    assert (params.logprobs, params.top_logprobs) == (True, None)
    assert not parse_chat(chat(logprobs=False, top_logprobs=0)).generation.parameters.wants_logprobs


def test_completion_logprobs_is_the_count_of_alternatives() -> None:
    body = {"model": "qwen2", "prompt": "p", "logprobs": 2}
    params = parse_completion(body).generation.parameters
    assert (params.logprobs, params.top_logprobs) == (True, 2)
    params = parse_completion({**body, "logprobs": 0}).generation.parameters
    assert (params.logprobs, params.top_logprobs) == (True, None)
    assert not parse_completion({**body, "logprobs": None}).generation.parameters.wants_logprobs


def test_an_engine_refusal_of_top_logprobs_is_named_logprobs_on_completions() -> None:
    from services.common.errors import FieldViolation, invalid

    error = invalid([FieldViolation("parameters.top_logprobs", "not supported")])
    parsed = parse_completion({"model": "qwen2", "prompt": "p", "logprobs": 2})
    assert openai_error(error, parsed)[1] == "logprobs"
    assert openai_error(error, parse_chat(chat(logprobs=True, top_logprobs=2)))[1] == (
        "top_logprobs")


def test_n_gives_seeded_choices_seed_then_seed_plus_one() -> None:
    parsed = parse_chat(chat(n=3, seed=7, temperature=0.8))
    assert parsed.n == 3
    assert [r.parameters.seed for r in choice_requests(parsed)] == [7, 8, 9]
    top = parse_chat(chat(n=2, seed=2**64 - 1, temperature=0.8))
    assert [r.parameters.seed for r in choice_requests(top)] == [2**64 - 1, 0]
    unseeded = parse_chat(chat(n=2, temperature=0.8))
    assert [r.parameters.seed for r in choice_requests(unseeded)] == [None, None]
    assert parse_chat(chat()).n == 1


# -- the engines' replies ------------------------------------------------------------


def test_tgi_asks_for_top_n_tokens_and_reads_details() -> None:
    engine = TGIEngine("http://127.0.0.1:1")
    sent = engine.body("p", Parameters(logprobs=True, top_logprobs=2), stream=False)
    assert sent["parameters"]["details"] is True and sent["parameters"]["top_n_tokens"] == 2
    assert "top_n_tokens" not in engine.body("p", Parameters(logprobs=True), False)["parameters"]
    # TGI's reply shape (details.tokens and details.top_tokens, one list per token).
    reply = [{"generated_text": "Hello world", "details": {
        "finish_reason": "eos_token", "generated_tokens": 3, "seed": None, "prefill": [],
        "tokens": [
            {"id": 1, "text": "Hello", "logprob": -0.25, "special": False},
            {"id": 2, "text": " world", "logprob": -0.5, "special": False},
            {"id": 0, "text": "<|im_end|>", "logprob": -0.1, "special": True}],
        "top_tokens": [
            [{"id": 1, "text": "Hello", "logprob": -0.25, "special": False},
             {"id": 3, "text": "Hi", "logprob": -1.5, "special": False}],
            [{"id": 2, "text": " world", "logprob": -0.5, "special": False},
             {"id": 4, "text": " there", "logprob": -2.0, "special": False}],
            [{"id": 0, "text": "<|im_end|>", "logprob": -0.1, "special": True}]],
    }}]
    result = _result(200, {"x-prompt-tokens": "4"}, reply, logprobs=True)
    assert result.logprobs == (
        TokenLogprob("Hello", -0.25, tuple(b"Hello"), HELLO.top),
        TokenLogprob(" world", -0.5, tuple(b" world"), (
            TokenLogprob(" world", -0.5, tuple(b" world")),
            TokenLogprob(" there", -2.0, tuple(b" there")))),
    )
    assert _result(200, {}, reply).logprobs == ()
    # A stream event's token; null logprobs are OpenAI's -9999.
    assert token_logprob({"text": "x", "logprob": None, "special": False}, None) == (
        TokenLogprob("x", -9999.0, (120,)))
    assert token_logprob({"text": "</s>", "logprob": -1, "special": True}, []) is None


def test_openai_engines_ask_per_route_and_read_both_shapes() -> None:
    engine = OpenAICompatibleEngine("http://h/v1", kind=KINDS["vllm"], served_model="m")
    params = Parameters(logprobs=True, top_logprobs=2)
    _, body = engine.body("p", params, stream=False)
    assert body["logprobs"] == 2 and "top_logprobs" not in body
    _, body = engine.body((Message("user", "hi"),), params, stream=False)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    _, body = engine.body("p", Parameters(), stream=False)
    assert "logprobs" not in body
    chat_choice = {"logprobs": {"content": [
        {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello"), "top_logprobs": [
            {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")},
            {"token": "Hi", "logprob": -1.5, "bytes": list(b"Hi")},
            {"token": "Hey", "logprob": -3.0, "bytes": list(b"Hey")}]}]}}
    assert choice_logprobs(chat_choice, 2) == (HELLO,)
    legacy = {"logprobs": {"tokens": ["Hello"], "token_logprobs": [-0.25], "text_offset": [0],
                           "top_logprobs": [{"Hey": -3.0, "Hello": -0.25, "Hi": -1.5}]}}
    assert choice_logprobs(legacy, 2) == (HELLO,)
    assert choice_logprobs({"logprobs": None}, 2) == ()


def test_an_engine_without_logprobs_refuses_them_by_name() -> None:
    engine = OpenAICompatibleEngine("http://h/v1", kind=KINDS["ollama"], served_model="m")
    for params, field in ((Parameters(logprobs=True), "parameters.logprobs"),
                          (Parameters(top_logprobs=3), "parameters.top_logprobs")):
        with pytest.raises(MeshError) as caught:
            engine.body("p", params, stream=False)
        assert [v.field for v in caught.value.violations] == [field]


# -- the contract ---------------------------------------------------------------------


def test_logprobs_survive_the_contract() -> None:
    g = generation()
    wire = pb_convert.generation_to_pb(g).SerializeToString()
    back = pb_convert.generation_from_pb(pb.GenerateResponse.FromString(wire))
    assert back == g
    assert back.logprobs[1].top[1].bytes is None  # unset, not empty
    chunk = Chunk("Hello", 1, (HELLO,))
    message = pb.GenerateStreamResponse.FromString(
        pb_convert.chunk_to_pb(chunk).SerializeToString())
    assert pb_convert.stream_event_from_pb(message) == chunk


# -- OpenAI's shapes ------------------------------------------------------------------


def test_chat_logprobs_shape() -> None:
    body = responses.completion("chat", generation(), id="c", created=1, top=2)
    assert body["choices"][0]["logprobs"] == {"content": [
        {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello"), "top_logprobs": [
            {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")},
            {"token": "Hi", "logprob": -1.5, "bytes": list(b"Hi")}]},
        {"token": " world", "logprob": -0.5, "bytes": list(b" world"), "top_logprobs": [
            {"token": " world", "logprob": -0.5, "bytes": list(b" world")},
            {"token": " there", "logprob": -2.0, "bytes": None}]},
    ], "refusal": None}
    assert responses.completion("chat", generation(), id="c", created=1)["choices"][0][
        "logprobs"] is None


def test_completion_logprobs_shape() -> None:
    body = responses.completion("completion", generation(), id="c", created=1, top=2)
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hello", " world"], "token_logprobs": [-0.25, -0.5],
        "top_logprobs": [{"Hello": -0.25, "Hi": -1.5}, {" world": -0.5, " there": -2.0}],
        "text_offset": [0, 5],
    }
    zero = responses.completion("completion", generation(), id="c", created=1, top=0)
    assert zero["choices"][0]["logprobs"]["top_logprobs"] is None


def test_several_choices_are_indexed_and_their_usage_summed() -> None:
    results = [generation("a", 3), generation("b c", 5), generation("d", 1)]
    body = responses.completions("chat", results, id="c", created=1)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b c", "d"]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_stream_chunks_carry_their_choice_index_and_their_tokens_logprobs() -> None:
    shapes = responses.ChunkShapes("completion", "qwen2", include_usage=True, top=1)
    first = shapes.first("Hello", 2, (HELLO,))["choices"][0]
    assert first["index"] == 2 and first["logprobs"]["tokens"] == ["Hello"]
    more = shapes.text(" world", 2, (WORLD,), offset=5)["choices"][0]
    assert more["logprobs"]["text_offset"] == [5]
    assert shapes.last(generation(), 1)["choices"][0]["index"] == 1
    assert shapes.usage([generation(tokens=2), generation(tokens=4)])["usage"][
        "completion_tokens"] == 6
    plain = responses.ChunkShapes("chat", "qwen2", include_usage=False)
    assert plain.text("x", 0, (HELLO,))["choices"][0]["logprobs"] is None
