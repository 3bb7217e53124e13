"""Scenario templates from scenarios.yaml."""

import pytest

from services.common.errors import MeshError
from services.common.types import GenerationRequest, Message
from services.router.scenarios import load_scenarios

SCENARIOS = load_scenarios()


def test_shipped_scenarios():
    assert set(SCENARIOS.names) >= {"chat", "qa", "summarize", "rewrite", "raw"}


def test_default_is_chat_with_inputs_as_user_message():
    out = SCENARIOS.apply(GenerationRequest(model_id="m", inputs="你好"))
    assert out.messages == (Message("user", "你好"),)
    assert out.scenario == "chat" and out.inputs == ""


@pytest.mark.parametrize("name", ["qa", "summarize", "rewrite"])
def test_task_scenarios_add_a_system_message(name):
    text = "人工智能是计算机科学的一个分支 {not a placeholder}"
    out = SCENARIOS.apply(GenerationRequest(model_id="m", inputs=text, scenario=name))
    system, user = out.messages
    assert system.role == "system" and system.content
    assert user.role == "user" and text in user.content


def test_raw_passes_inputs_verbatim():
    out = SCENARIOS.apply(GenerationRequest(model_id="m", inputs="<|im_start|>x", scenario="raw"))
    assert out.inputs == "<|im_start|>x" and out.messages == () and out.scenario == "raw"


def test_conversation_keeps_its_own_system_message():
    conv = (Message("system", "mine"), Message("user", "q"))
    out = SCENARIOS.apply(GenerationRequest(model_id="m", messages=conv, scenario="qa"))
    assert out.messages == conv
    bare = SCENARIOS.apply(GenerationRequest(model_id="m", messages=conv[1:], scenario="qa"))
    assert bare.messages[0].role == "system" and bare.messages[1:] == conv[1:]


def test_unknown_scenario_is_invalid_and_lists_known():
    with pytest.raises(MeshError) as caught:
        SCENARIOS.apply(GenerationRequest(model_id="m", inputs="x", scenario="poem"))
    assert caught.value.violations[0].field == "scenario"
    assert "summarize" in caught.value.message


def test_bad_scenarios_file_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  qa:\n    user: 'no placeholder'\n")
    with pytest.raises(SystemExit, match="inputs"):
        load_scenarios(path)
