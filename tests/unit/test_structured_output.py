"""Structured output and the penalties: domain <-> llmmesh.v1, validation,
and the body the adapter sends to TGI."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.engines.tgi import TGIEngine
from services.common import pb_convert
from services.common.errors import MeshError
from services.common.types import GenerationRequest, Grammar, Limits, Parameters
from services.common.validation import validate

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_a_json_schema_survives_the_contract_with_whole_numbers_intact() -> None:
    params = Parameters(grammar=Grammar.json_schema(SCHEMA), frequency_penalty=0.5,
                        presence_penalty=-1.0)
    wire = pb_convert.parameters_to_pb(params).SerializeToString()
    back = pb_convert.parameters_from_pb(pb.GenerationParameters.FromString(wire))
    assert back == params
    assert back.grammar is not None
    assert back.grammar.schema() == SCHEMA
    assert isinstance(back.grammar.schema()["properties"]["name"]["minLength"], int)


def test_http_json_spelling_of_the_grammar() -> None:
    # What Envoy's transcoder builds from `"grammar": {"json_schema": {...}}`.
    message = json_format.ParseDict({"grammar": {"json_schema": SCHEMA}}, pb.GenerationParameters())
    assert pb_convert.parameters_from_pb(message).grammar == Grammar.json_schema(SCHEMA)
    message = json_format.ParseDict({"grammar": {"regex": "[0-9]+"}}, pb.GenerationParameters())
    assert pb_convert.parameters_from_pb(message).grammar == Grammar("regex", "[0-9]+")
    assert pb_convert.parameters_from_pb(pb.GenerationParameters()).grammar is None


def test_defaults_fill_the_new_fields() -> None:
    defaults = Parameters(frequency_penalty=0.1, grammar=Grammar("regex", "a+"))
    assert Parameters().with_defaults(defaults) == defaults
    mine = Parameters(frequency_penalty=0.3, grammar=Grammar("regex", "b+"))
    assert mine.with_defaults(defaults) == mine


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (Parameters(frequency_penalty=2.5), "parameters.frequency_penalty"),
        (Parameters(presence_penalty=float("nan")), "parameters.presence_penalty"),
        (Parameters(grammar=Grammar("json", "[1, 2]")), "parameters.grammar.json_schema"),
        (Parameters(grammar=Grammar("json", "{not json")), "parameters.grammar.json_schema"),
        (Parameters(grammar=Grammar("regex", "(")), "parameters.grammar.regex"),
        (Parameters(grammar=Grammar("regex", "")), "parameters.grammar.regex"),
        (Parameters(grammar=Grammar("regex", "a" * 40_000)), "parameters.grammar"),
    ],
)
def test_bad_grammars_and_penalties_name_the_field(params: Parameters, field: str) -> None:
    with pytest.raises(MeshError) as caught:
        validate(GenerationRequest(model_id="qwen2", inputs="hi", parameters=params), Limits())
    assert [v.field for v in caught.value.violations] == [field]


def test_good_grammars_pass() -> None:
    for grammar in (Grammar.json_schema(SCHEMA), Grammar("regex", r"\d{3}-\d{4}")):
        validate(GenerationRequest(model_id="q", inputs="hi",
                                   parameters=Parameters(grammar=grammar)), Limits())


def test_tgi_body_carries_the_grammar_and_frequency_penalty() -> None:
    backend = TGIEngine("http://127.0.0.1:1")
    body = backend.body("p", Parameters(grammar=Grammar.json_schema(SCHEMA),
                                        frequency_penalty=-0.5), stream=False)
    sent = json.loads(json.dumps(body))  # as aiohttp serializes it
    assert sent["parameters"]["grammar"] == {"type": "json", "value": SCHEMA}
    assert sent["parameters"]["frequency_penalty"] == -0.5
    body = backend.body("p", Parameters(grammar=Grammar("regex", "[a-z]+")), stream=True)
    assert json.loads(json.dumps(body))["parameters"]["grammar"] == {
        "type": "regex", "value": "[a-z]+"}
    assert "frequency_penalty" not in body["parameters"] or \
        body["parameters"]["frequency_penalty"] is None


def test_tgi_refuses_presence_penalty_by_name() -> None:
    with pytest.raises(MeshError) as caught:
        TGIEngine("http://127.0.0.1:1").body("p", Parameters(presence_penalty=0.5), stream=False)
    assert [v.field for v in caught.value.violations] == ["parameters.presence_penalty"]
