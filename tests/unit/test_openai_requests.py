"""OpenAI request bodies -> the mesh's request, and every refusal naming its field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.common.errors import FieldViolation, MeshError, Reason, invalid
from services.common.types import Grammar, Message
from services.openai.requests import openai_error, param_of, parse_chat, parse_completion


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "qwen2", "messages": [{"role": "user", "content": "Hi"}], **fields}


def refused(body: Any, parse=parse_chat) -> dict[str, str]:
    """field -> description of every violation of `body`."""
    with pytest.raises(MeshError) as err:
        parse(body)
    assert err.value.reason is Reason.INVALID_ARGUMENT
    return {v.field: v.description for v in err.value.violations}


def test_a_minimal_chat_becomes_messages_for_the_chat_template():
    parsed = parse_chat(chat())
    g = parsed.generation
    assert g.model_id == "qwen2"
    assert g.messages == (Message("user", "Hi"),)
    assert g.inputs == "" and g.scenario == ""
    assert not parsed.stream and not parsed.include_usage


def test_roles_and_text_parts():
    parsed = parse_chat(chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}], "name": "ann"},
        {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": []},
        {"role": "user", "content": "three"},
    ]))
    assert parsed.generation.messages == (
        Message("system", "Be brief."), Message("user", "one\ntwo"),
        Message("assistant", "ok"), Message("user", "three"),
    )


def test_parameters_map_onto_the_domain():
    p = parse_chat(chat(max_tokens=12, temperature=0.5, top_p=0.9, stop="END", seed=7,
                        frequency_penalty=0.5, presence_penalty=0, n=1, user="u1")).generation
    params = p.parameters
    assert params.max_new_tokens == 12
    assert params.temperature == 0.5 and params.top_p == 0.9
    assert params.stop == ("END",) and params.seed == 7
    assert params.frequency_penalty == 0.5
    assert params.presence_penalty is None  # 0 asks for nothing
    assert params.grammar is None and params.do_sample is None


def test_max_completion_tokens_wins_and_names_errors():
    parsed = parse_chat(chat(max_tokens=5, max_completion_tokens=9))
    assert parsed.generation.parameters.max_new_tokens == 9
    assert parsed.param_of("parameters.max_new_tokens") == "max_completion_tokens"
    assert parse_chat(chat(max_tokens=5)).param_of("parameters.max_new_tokens") == "max_tokens"


def test_temperature_zero_is_greedy_and_drops_sampling_knobs():
    params = parse_chat(chat(temperature=0, top_p=0.5, top_k=5)).generation.parameters
    assert params.do_sample is False and not params.sampling
    assert params.temperature is None and params.top_p is None and params.top_k is None


def test_top_p_one_means_no_nucleus():
    assert parse_chat(chat(top_p=1)).generation.parameters.top_p is None


def test_stop_list():
    assert parse_chat(chat(stop=["a", "b"])).generation.parameters.stop == ("a", "b")


@pytest.mark.parametrize(
    ("fmt", "schema"),
    [
        # TGI wants `properties`; any keys are allowed.
        ({"type": "json_object"},
         {"type": "object", "properties": {}, "additionalProperties": True}),
        ({"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
         {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
    ],
)
def test_response_format_becomes_a_json_grammar(fmt, schema):
    grammar = parse_chat(chat(response_format=fmt)).generation.parameters.grammar
    assert grammar == Grammar.json_schema(schema)
    assert grammar is not None and grammar.schema() == schema


def test_response_format_text_asks_for_nothing():
    assert parse_chat(chat(response_format={"type": "text"})).generation.parameters.grammar is None


def test_stream_options():
    parsed = parse_chat(chat(stream=True, stream_options={"include_usage": True}))
    assert parsed.stream and parsed.include_usage


def test_completion_prompt_goes_raw():
    parsed = parse_completion({"model": "llama", "prompt": "Once upon", "max_tokens": 3})
    g = parsed.generation
    assert (g.model_id, g.inputs, g.scenario, g.messages) == ("llama", "Once upon", "raw", ())
    assert parse_completion({"model": "m", "prompt": ["only one"]}).generation.inputs == "only one"
    assert parsed.param_of("inputs") == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"n": "2"}, "n"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": 3}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream_options": {"chunk_size": 1}}, "stream_options.chunk_size"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
         "response_format.json_schema.schema"),
        ({"response_format": "json"}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"prompt": "x"}, "prompt"),
        ({"model": ""}, "model"),
        ({"model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": ["Hi"]}, "messages[0]"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
         "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "x"}]},
         "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
                       {"role": "user", "content": "y"}]}, "messages[0].tool_calls[0]"),
        ({"messages": [{"role": "user", "content": "x", "mood": "sunny"}]},
         "messages[0].mood"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(fields, param):
    problems = refused(chat(**fields))
    assert param in problems, problems


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": True}, "best_of"),  # Python's True == 1: not a count
        ({"best_of": 3, "n": 2}, "n"),
        ({"n": 9}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"messages": []}, "messages"),
    ],
)
def test_completion_refusals(fields, param):
    problems = refused({"model": "qwen2", "prompt": "p", **fields}, parse_completion)
    assert param in problems, problems


def test_neutral_values_of_unsupported_fields_are_accepted():
    parse_chat(chat(tools=[], tool_choice="none", logprobs=False, top_logprobs=None,
                    logit_bias={}, modalities=["text"], parallel_tool_calls=True,
                    store=False, metadata={"k": "v"}, service_tier="auto"))
    parse_completion({"model": "m", "prompt": "p", "echo": False, "best_of": 1, "logprobs": None})


def test_every_problem_is_reported_at_once():
    problems = refused(chat(n=30, temperature=9, tools=[{"type": "function"}]))
    assert {"n", "temperature", "tools[0].function"} <= set(problems)


def test_a_body_that_is_not_an_object():
    assert "body" in refused([1, 2])
    assert "body" in refused("text")


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("model_id", "model"),
        ("parameters.top_p", "top_p"),
        ("parameters.stop", "stop"),
        ("parameters.grammar.json_schema", "response_format"),
        ("parameters.presence_penalty", "presence_penalty"),
        ("messages[2].role", "messages[2].role"),
        ("messages", "messages"),
        ("body", None),
    ],
)
def test_mesh_fields_get_openai_names(field, param):
    assert param_of(field) == param


def test_the_error_message_speaks_openai():
    parsed = parse_chat(chat(max_completion_tokens=5))
    error = invalid([FieldViolation("parameters.max_new_tokens", "must be between 1 and 2048"),
                     FieldViolation("parameters.stop", "at most 4")])
    message, param = openai_error(error, parsed)
    assert param == "max_completion_tokens"
    assert message == ("invalid request: max_completion_tokens: must be between 1 and 2048; "
                       "stop: at most 4")
    assert "parameters." not in message


def test_hostile_values_are_cut_in_messages():
    problems = refused(chat(messages=[{"role": "x" * 10_000, "content": "hi"}]))
    assert len(json.dumps(problems)) < 400


def test_an_engine_refusing_the_grammar_names_response_format():
    parsed = parse_chat(chat(response_format={"type": "json_schema",
                                              "json_schema": {"schema": {"type": "array"}}}))
    error = MeshError(Reason.INVALID_ARGUMENT,
                      "Input validation error: grammar is not valid: no properties")
    assert openai_error(error, parsed)[1] == "response_format"
    assert openai_error(error, parse_chat(chat()))[1] is None
