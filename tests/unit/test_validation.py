"""Request validation rules (shared by the router and the adapters)."""

import math

import pytest

from services.common.errors import MeshError, Reason
from services.common.types import GenerationRequest, Limits, Message, Parameters
from services.common.validation import validate

LIMITS = Limits(max_new_tokens=512, max_stop_sequences=4, max_input_chars=100, max_messages=3)


def fields_of(request: GenerationRequest) -> list[str]:
    with pytest.raises(MeshError) as caught:
        validate(request, LIMITS)
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert caught.value.code == "INVALID_ARGUMENT"
    return [v.field for v in caught.value.violations]


def req(inputs="hi", **params) -> GenerationRequest:
    return GenerationRequest(model_id="qwen2", inputs=inputs, parameters=Parameters(**params))


def test_a_good_request_passes():
    validate(req(max_new_tokens=512, temperature=0.7, top_p=0.9, top_k=50,
                 repetition_penalty=1.1, stop=("\n",) * 4, seed=1), LIMITS)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"max_new_tokens": -3}, "parameters.max_new_tokens"),
        ({"max_new_tokens": 513}, "parameters.max_new_tokens"),
        ({"temperature": 0.0}, "parameters.temperature"),
        ({"temperature": -1.0}, "parameters.temperature"),
        ({"temperature": math.nan}, "parameters.temperature"),
        ({"temperature": math.inf}, "parameters.temperature"),
        ({"top_p": 0.0}, "parameters.top_p"),
        ({"top_p": 1.0}, "parameters.top_p"),
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"top_k": 0}, "parameters.top_k"),
        ({"repetition_penalty": 0.0}, "parameters.repetition_penalty"),
        ({"stop": ("a", "b", "c", "d", "e")}, "parameters.stop"),
        ({"stop": ("",)}, "parameters.stop"),
    ],
)
def test_bad_parameter_is_named(params, field):
    assert fields_of(req(**params)) == [field]


def test_empty_and_oversized_inputs():
    assert fields_of(req("")) == ["inputs"]
    assert fields_of(req("   \n")) == ["inputs"]
    assert fields_of(req("x" * 101)) == ["inputs"]


def test_every_violation_is_reported_at_once():
    assert fields_of(req("", temperature=0.0, top_p=2.0)) == [
        "inputs", "parameters.temperature", "parameters.top_p",
    ]


def test_messages_rules():
    def with_messages(*messages):
        return GenerationRequest(model_id="m", messages=tuple(Message(*m) for m in messages))

    validate(with_messages(("system", "be brief"), ("user", "hi")), LIMITS)
    assert fields_of(with_messages(("wizard", "hi"))) == ["messages[0].role"]
    assert fields_of(with_messages(("user", "hi"), ("assistant", "hello"))) == ["messages"]
    assert fields_of(with_messages(*[("user", "a")] * 4)) == ["messages"]
