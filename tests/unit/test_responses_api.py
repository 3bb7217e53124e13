"""The Responses API over chat completions: requests translated, results and
streams shaped as the OpenAI SDK's own types (and its stream helper) read them."""

import json

import httpx2 as httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from services.common.errors import MeshError, Reason
from services.openai.responses_api import (
    ResponseEvents,
    build_response,
    encode_event,
    translate_request,
)

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


def _sdk_body(**kwargs):
    """The body the OpenAI SDK itself sends for responses.create(**kwargs)."""
    seen = {}

    def handler(request):
        seen["body"] = json.loads(request.content)
        return httpx.Response(500, json={"error": {"message": "stop here"}})

    client = openai.OpenAI(api_key="x", base_url="http://mesh/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(openai.InternalServerError):
        client.responses.create(**kwargs)
    return seen["body"]


def test_text_input_and_every_generation_field():
    body = _sdk_body(model="qwen2", input="Name a colour.", instructions="Be brief.",
                     max_output_tokens=20, temperature=0.5, top_p=0.9, text={"format": {
                         "type": "json_schema", "name": "colour", "strict": True,
                         "schema": {"type": "object", "properties": {"c": {"type": "string"}}}}})
    request = translate_request(body)
    assert request.chat == {
        "model": "qwen2",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Name a colour."}],
        "max_completion_tokens": 20, "temperature": 0.5, "top_p": 0.9,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "colour", "strict": True,
            "schema": {"type": "object", "properties": {"c": {"type": "string"}}}}},
    }
    assert not request.stream


def test_items_with_a_call_and_its_output():
    body = _sdk_body(model="qwen2", tools=[WEATHER], stream=True,
                     tool_choice={"type": "function", "name": "get_weather"},
                     input=[
                         {"role": "developer", "content": "Use tools."},
                         {"type": "message", "role": "user",
                          "content": [{"type": "input_text", "text": "Oslo?"}]},
                         {"type": "message", "role": "assistant", "id": "msg_1",
                          "status": "completed", "content": [
                              {"type": "output_text", "text": "Checking.", "annotations": []}]},
                         {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                          "arguments": '{"city": "Oslo"}', "id": "fc_1", "status": "completed"},
                         {"type": "function_call_output", "call_id": "call_1", "output": "4°C"},
                     ])
    request = translate_request(body)
    assert request.stream
    assert request.chat["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4°C"},
    ]
    assert request.chat["tools"] == [{"type": "function", "function": {
        k: WEATHER[k] for k in ("name", "description", "parameters", "strict")}}]
    assert request.chat["tool_choice"] == {"type": "function",
                                           "function": {"name": "get_weather"}}
    assert request.chat["stream_options"] == {"include_usage": True}


def test_absent_or_false_store_is_stateless_and_accepted():
    assert translate_request({"model": "m", "input": "x"}).echo["store"] is False
    assert translate_request({"model": "m", "input": "x", "store": False}).chat


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no state"),
    ({"conversation": "conv_1"}, "conversation", "keeps no state"),
    ({"store": True}, "store", "keeps no state"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "only function tools"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "no state"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type", "only text parts"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", ""),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "json_schema"),
    ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice", "function"),
    ({"background": True}, "background", "not supported"),
    ({"frobnicate": 1}, "frobnicate", "unrecognized"),
    ({"input": []}, "input", "non-empty"),
])
def test_refusals_name_the_field(body, field, words):
    with pytest.raises(MeshError) as caught:
        translate_request({"model": "m", "input": "x", **body})
    error = caught.value
    assert error.reason is Reason.INVALID_ARGUMENT and error.http_status == 400
    assert error.violations[0].field == field
    assert words in error.violations[0].description


def _completion(content, calls=(), finish="stop"):
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
            "name": name, "arguments": args}} for i, (name, args) in enumerate(calls)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1796028484,
            "model": "qwen2", "choices": [{"index": 0, "message": message,
                                           "finish_reason": finish}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}


def test_result_is_a_response_object():
    request = translate_request({"model": "qwen2", "input": "Oslo?", "tools": [WEATHER]})
    reply = build_response(_completion("Checking.", [("get_weather", '{"city": "Oslo"}')],
                                       "tool_calls"), request)
    response = Response.model_validate(reply)
    assert response.status == "completed" and response.output_text == "Checking."
    call = response.output[1]
    assert call.type == "function_call" and call.call_id == "call_0"
    assert call.arguments == '{"city": "Oslo"}'
    assert response.usage.input_tokens == 12 and response.usage.total_tokens == 20
    assert response.tools[0].name == "get_weather" and response.store is False


def test_length_makes_an_incomplete_response():
    request = translate_request({"model": "qwen2", "input": "x", "max_output_tokens": 3})
    response = Response.model_validate(build_response(_completion("a b c", finish="length"),
                                                      request))
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


def _chunks():
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen2"}

    def chunk(delta, finish=None):
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])

    return [
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Check"}), chunk({"content": "ing."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_weather",
                                            "arguments": '{"city": "Rome"}'}}]}),
        chunk({}, "tool_calls"),
        dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 7,
                                      "total_tokens": 12}),
    ]


def _events(request):
    stream = ResponseEvents(request, model="qwen2")
    events = stream.start()
    for c in _chunks():
        events += stream.chunk(c)
    return events + stream.finish()


def test_stream_events_are_the_sdks_types_in_order():
    request = translate_request({"model": "qwen2", "input": "x", "tools": [WEATHER],
                                 "stream": True})
    events = [EVENTS.validate_python(e) for e in _events(request)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].response
    assert final.output_text == "Checking."
    assert [(o.call_id, o.arguments) for o in final.output[1:]] == [
        ("call_a", '{"city": "Oslo"}'), ("call_b", '{"city": "Rome"}')]
    assert final.usage.output_tokens == 7
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_the_sdks_stream_helper_rebuilds_the_response():
    request = translate_request({"model": "qwen2", "input": "x", "tools": [WEATHER],
                                 "stream": True})
    payload = b"".join(encode_event(e) for e in _events(request))

    def handler(_):
        return httpx.Response(200, content=payload,
                              headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(api_key="x", base_url="http://mesh/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with client.responses.stream(model="qwen2", input="x") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Checking."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Oslo", "Rome"]


def test_an_error_after_the_start_is_an_error_event():
    stream = ResponseEvents(translate_request({"model": "m", "input": "x"}), model="m")
    stream.start()
    event = EVENTS.validate_python(stream.error(MeshError(Reason.TIMEOUT, "deadline"))[0])
    assert event.type == "error" and event.message == "deadline" and event.sequence_number == 2


def test_chat_field_errors_are_named_as_the_responses_api_names_them():
    from services.common.errors import FieldViolation, invalid
    from services.openai.requests import parse_chat
    from services.openai.responses_api import in_responses_terms, responses_field

    assert responses_field("max_completion_tokens") == "max_output_tokens"
    assert responses_field("response_format.json_schema") == "text.format.json_schema"
    assert responses_field("messages[2].content") == "input[2].content"
    assert responses_field("tools[0].function.parameters") == "tools[0].parameters"
    assert responses_field("temperature") == "temperature"
    chat = translate_request({"model": "qwen2", "input": "hi", "max_output_tokens": -1}).chat
    with pytest.raises(MeshError) as caught:
        parse_chat(chat)
    renamed = in_responses_terms(caught.value)
    assert [v.field for v in renamed.violations] == ["max_output_tokens"]
    error = in_responses_terms(invalid([FieldViolation("tool_choice", "x")]))
    assert error.violations[0].field == "tool_choice"
