"""The parameter table: it agrees with `Parameters` and the proto, and the
conversions, checks, defaults, engine bodies and span attributes follow it."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
from llmmesh.v1 import generate_pb2 as pb

from services.adapter.engines.openai_compatible import OpenAICompatibleEngine
from services.adapter.engines.tgi import TGIEngine
from services.common import parameters as table
from services.common import pb_convert
from services.common.engine_kinds import KINDS
from services.common.errors import MeshError
from services.common.registry import DEFAULT_REGISTRY, ModelSpec, load_registry
from services.common.types import Grammar, Limits, Parameters

# One value of every parameter, each asking for something.
EVERY: dict[str, Any] = {
    "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
    "repetition_penalty": 1.2, "stop": ("###",), "seed": 3, "do_sample": True,
    "grammar": Grammar.json_schema({"type": "object", "properties": {"n": {"minimum": 1}}}),
    "frequency_penalty": 0.5, "presence_penalty": -0.5, "logprobs": True, "top_logprobs": 3,
}


def test_the_table_parameters_and_the_proto_name_the_same_fields() -> None:
    table.check_table()
    declared = [f.name for f in fields(Parameters)]
    assert sorted(declared) == sorted(table.NAMES) == sorted(EVERY)
    proto = {f.name for f in pb.GenerationParameters.DESCRIPTOR.fields}
    assert proto == set(table.NAMES)


def test_every_parameter_survives_the_contract() -> None:
    params = Parameters(**EVERY)
    wire = pb_convert.parameters_to_pb(params).SerializeToString()
    back = pb_convert.parameters_from_pb(pb.GenerationParameters.FromString(wire))
    assert back == params
    # Struct stores numbers as doubles; whole ones come back as ints.
    assert isinstance(back.grammar.schema()["properties"]["n"]["minimum"], int)  # type: ignore[union-attr]
    assert pb_convert.parameters_from_pb(pb.GenerationParameters()) == Parameters()


@pytest.mark.parametrize(
    ("name", "bad"),
    [("max_new_tokens", 0), ("max_new_tokens", 10_000), ("temperature", 0.0),
     ("top_p", 1.0), ("top_k", 0), ("repetition_penalty", float("inf")),
     ("stop", ("a", "b", "c", "d", "e")), ("stop", ("",)),
     ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("top_logprobs", 21),
     ("top_logprobs", -1)],
)
def test_each_check_names_its_field(name: str, bad: Any) -> None:
    problems = table.check_parameters(Parameters(**{name: bad}), Limits())
    assert [p.field for p in problems] == [f"parameters.{name}"]
    assert table.check_parameters(Parameters(**{name: EVERY[name]}), Limits()) == []


def test_defaults_come_from_the_table_under_the_registry() -> None:
    assert Parameters().with_defaults(table.BUILTIN_DEFAULTS).max_new_tokens == 20
    assert ModelSpec("m", "M").defaults == table.BUILTIN_DEFAULTS
    qwen2 = load_registry(DEFAULT_REGISTRY, {}).get("qwen2")
    assert qwen2.defaults.max_new_tokens == 256  # the registry's own wins
    mine = Parameters(max_new_tokens=5, stop=("x",))
    assert mine.with_defaults(qwen2.defaults).max_new_tokens == 5
    assert Parameters().with_defaults(qwen2.defaults) is qwen2.defaults


def test_tgi_body_spells_what_tgi_takes_and_refuses_the_rest() -> None:
    engine = TGIEngine("http://127.0.0.1:1")
    accepted = {k: v for k, v in EVERY.items() if table.BY_NAME[k].tgi is not None}
    body = engine.body("p", Parameters(**accepted), stream=False)
    sent = body["parameters"]
    for name in accepted:
        assert table.BY_NAME[name].tgi in sent, name
    assert sent["grammar"] == {"type": "json", "value": EVERY["grammar"].value}
    assert sent["stop"] == ["###"] and sent["details"] is True
    assert sent["return_full_text"] is False  # TGI's `/` route would echo the prompt
    for name in (p.name for p in table.PARAMS if p.tgi is None):
        with pytest.raises(MeshError) as caught:
            engine.body("p", Parameters(**{name: EVERY[name]}), stream=False)
        assert [v.field for v in caught.value.violations] == [f"parameters.{name}"]


@pytest.mark.parametrize("kind", [k for k in KINDS.values() if k.api == "openai"],
                         ids=lambda k: k.name)
def test_openai_kinds_spell_or_refuse_each_parameter(kind: Any) -> None:
    engine = OpenAICompatibleEngine("http://h/v1", kind=kind, served_model="m")
    for spec in table.PARAMS:
        if spec.engine is None:
            continue  # sent as the driver decides (do_sample, grammar)
        if spec.name in ("logprobs", "top_logprobs"):
            continue  # shaped by the route (tests/unit/test_logprobs.py)
        field = kind.spellings.get(spec.name, spec.engine)
        params = Parameters(**{spec.name: EVERY[spec.name], "do_sample": True})
        if field is None:
            with pytest.raises(MeshError):
                engine.body("p", params, stream=False)
        else:
            _, body = engine.body("p", params, stream=False)
            value = EVERY[spec.name]
            assert body[field] == (list(value) if isinstance(value, tuple) else value)


def test_span_attributes_come_from_the_table() -> None:
    from services.common import tracing_grpc

    request = pb.GenerateRequest(
        model_id="qwen2", inputs="hi", parameters=pb_convert.parameters_to_pb(Parameters(**EVERY)))
    attrs = tracing_grpc.request_attributes(request)
    for p in table.PARAMS:
        if p.span is not None:
            value = EVERY[p.name]
            assert attrs[p.span] == (list(value) if isinstance(value, tuple) else value), p.name
    bare = tracing_grpc.request_attributes(pb.GenerateRequest(model_id="qwen2", inputs="hi"))
    assert not any(k.startswith("gen_ai.request.") and k != "gen_ai.request.model" for k in bare)
