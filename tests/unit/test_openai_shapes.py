"""OpenAI's response, chunk, model and error shapes, and the error table's statuses."""

from __future__ import annotations

import json

import pytest

from services.common.errors import (
    HTTP_STATUS,
    HTTP_STATUS_OF_REASON,
    TABLE,
    FieldViolation,
    MeshError,
    Reason,
    invalid,
)
from services.common.types import FinishReason, Generation, Limits, ModelInfo
from services.openai import responses
from services.openai.errors import error_reply
from services.openai.requests import parse_chat
from services.openai.sse import DONE, event


def result(text: str = "Hello there", finish: FinishReason = FinishReason.EOS_TOKEN) -> Generation:
    return Generation(text=text, model="Qwen2-7B-Instruct-GPTQ-Int4", model_id="qwen2",
                      tokens=2, input_tokens=9, finish_reason=finish)


def test_chat_completion_shape():
    body = responses.completion("chat", result(), id="chatcmpl-1", created=5)
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "qwen2",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }


def test_usage_says_the_prompt_tokens_the_engine_reused_whole_and_streamed():
    reused = Generation(text="Hi", model="M", model_id="m", tokens=2, input_tokens=1200,
                        finish_reason=FinishReason.EOS_TOKEN, cached_input_tokens=1152)
    body = responses.completion("chat", reused, id="x", created=0)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1152}
    shapes = responses.ChunkShapes("chat", "m", include_usage=True)
    assert shapes.usage(reused)["usage"]["prompt_tokens_details"] == {"cached_tokens": 1152}


def test_text_completion_shape():
    body = responses.completion("completion", result(finish=FinishReason.LENGTH), id="c",
                                created=1)
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hello there", "logprobs": None,
                                "finish_reason": "length"}]


@pytest.mark.parametrize(
    ("finish", "openai"),
    [(FinishReason.EOS_TOKEN, "stop"), (FinishReason.STOP_SEQUENCE, "stop"),
     (FinishReason.LENGTH, "length")],
)
def test_finish_reasons(finish, openai):
    assert responses.completion("chat", result(finish=finish), id="x", created=0)[
        "choices"][0]["finish_reason"] == openai


def test_chat_chunks_share_an_id_and_carry_role_then_text_then_finish_then_usage():
    shapes = responses.ChunkShapes("chat", "qwen2", include_usage=True)
    first, text = shapes.first("Hel"), shapes.text("lo")
    last, usage = shapes.last(result()), shapes.usage(result())
    assert {c["id"] for c in (first, text, last, usage)} == {shapes.id}
    assert shapes.id.startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in (first, text, last, usage))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert text["choices"][0]["delta"] == {"content": "lo"}
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert first["usage"] is None and last["usage"] is None
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 11


def test_chunks_without_include_usage_have_no_usage_key():
    shapes = responses.ChunkShapes("completion", "qwen2", include_usage=False)
    chunk = shapes.text("x")
    assert "usage" not in chunk and chunk["object"] == "text_completion"
    assert chunk["choices"][0]["text"] == "x"


def test_model_objects_keep_the_mesh_facts():
    info = ModelInfo(id="qwen2", name="Qwen2", aliases=("qwen",), engine_model="smol",
                     limits=Limits(max_input_tokens=100, max_total_tokens=200), ready=True,
                     replicas=2, ready_replicas=1)
    listing = responses.model_list([info], created=7)
    assert listing["object"] == "list"
    model = listing["data"][0]
    assert {k: model[k] for k in ("id", "object", "created", "owned_by")} == {
        "id": "qwen2", "object": "model", "created": 7, "owned_by": "llmmesh"}
    assert model["aliases"] == ["qwen"] and model["backend_model"] == "smol"
    assert model["ready"] is True and model["ready_replicas"] == 1


def test_sse_framing():
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_an_http_status_and_an_openai_error(reason):
    error = MeshError(reason, "something")
    reply = error_reply(error)
    assert reply.status == error.http_status
    assert reply.status == HTTP_STATUS_OF_REASON.get(reason, HTTP_STATUS[TABLE[reason].code])
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["code"] == reason.label
    assert reply.headers["x-should-retry"] == ("true" if TABLE[reason].retryable else "false")


@pytest.mark.parametrize(
    ("reason", "status", "kind"),
    [
        (Reason.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (Reason.UNAUTHENTICATED, 401, "authentication_error"),
        (Reason.MODEL_NOT_FOUND, 404, "invalid_request_error"),
        (Reason.OVERLOADED, 429, "rate_limit_error"),
        (Reason.MODEL_ERROR, 500, "server_error"),
        (Reason.INTERNAL, 500, "server_error"),
        (Reason.MODEL_UNAVAILABLE, 503, "server_error"),
        (Reason.BACKEND_UNAVAILABLE, 503, "server_error"),
        (Reason.INCOMPLETE_GENERATION, 503, "server_error"),
        (Reason.TIMEOUT, 504, "server_error"),
        (Reason.ROUTE_NOT_FOUND, 404, "invalid_request_error"),
        (Reason.REQUEST_TOO_LARGE, 413, "invalid_request_error"),
        (Reason.ROUTER_UNAVAILABLE, 503, "server_error"),
    ],
)
def test_the_sdk_classes_follow_the_status(reason, status, kind):
    reply = error_reply(MeshError(reason, "x"))
    assert (reply.status, reply.body["error"]["type"]) == (status, kind)


def test_retry_after_travels_as_both_headers():
    reply = error_reply(MeshError(Reason.OVERLOADED, "busy", retry_after=1.5))
    assert reply.headers["retry-after"] == "2"
    assert reply.headers["retry-after-ms"] == "1500"
    assert "retry-after" not in error_reply(MeshError(Reason.OVERLOADED, "busy")).headers


def test_unknown_model_names_the_model_param():
    body = error_reply(MeshError(Reason.MODEL_NOT_FOUND, "unknown model 'x'")).body["error"]
    assert body["param"] == "model" and body["code"] == "model_not_found"


def test_bad_parameter_names_the_openai_param():
    parsed = parse_chat({"model": "q", "messages": [{"role": "user", "content": "x"}],
                         "top_p": 0.5})
    error = invalid([FieldViolation("parameters.top_p", "must be less than 1")])
    body = error_reply(error, parsed).body
    assert body["error"]["param"] == "top_p"
    assert body["error"]["message"] == "invalid request: top_p: must be less than 1"
    json.dumps(body)
