"""Rendering tools into prompts: Qwen2 (Hermes), Llama 3.1 (JSON, ipython) and
the generic format, with calls and results in the history."""

from pathlib import Path

import pytest

from services.adapter.chat_template import ChatTemplate
from services.adapter.tool_calls.render import Family, family_of, render
from services.adapter.tool_calls.types import Tool, ToolCall, Turn
from services.common.errors import MeshError, Reason
from services.common.types import Message

TEMPLATES = Path(__file__).parents[2] / "models" / "templates"
WEATHER = Tool("get_weather", "Get the weather.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CONVERSATION = (
    Turn("user", "Weather in Paris and Oslo?"),
    Turn("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                           ToolCall("call_2", "get_weather", '{"city": "Oslo"}'))),
    Turn("tool", "18°C", tool_call_id="call_1"),
    Turn("tool", "4°C", tool_call_id="call_2"),
)
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
                '"Get the weather.", "parameters": {"type": "object", "properties": {"city": '
                '{"type": "string"}}, "required": ["city"]}}}')


def test_families_of_the_shipped_templates():
    assert family_of((TEMPLATES / "qwen2.jinja").read_text()) is Family.HERMES
    assert family_of((TEMPLATES / "llama3.jinja").read_text()) is Family.LLAMA3_JSON
    assert family_of("{{ messages }}") is Family.GENERIC


def test_qwen2_hermes_prompt():
    template = ChatTemplate.load(TEMPLATES / "qwen2.jinja")
    text = render(Family.HERMES, CONVERSATION, [WEATHER], template.render)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + WEATHER_JSON + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C\n</tool_response>\n"
        "<tool_response>\n4°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen2_keeps_the_clients_system_prompt_and_text_before_calls():
    template = ChatTemplate.load(TEMPLATES / "qwen2.jinja")
    turns = (Turn("system", "Be terse."), Turn("user", "Paris?"),
             Turn("assistant", "Checking.", (ToolCall("c", "get_weather", '{"city":"Paris"}'),)))
    text = render(Family.HERMES, turns, [WEATHER], template.render)
    assert text.startswith("<|im_start|>system\nBe terse.\n\n# Tools\n")
    assert ("<|im_start|>assistant\nChecking.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
            in text)


def test_llama31_json_prompt():
    text = render(Family.LLAMA3_JSON, (Turn("system", "Be brief."), *CONVERSATION), [WEATHER],
                  lambda m: pytest.fail("Llama 3.1 renders itself"))
    assert text == (
        "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its "
        "proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}. Do not use variables.\n\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n'
        '        "description": "Get the weather.",\n        "parameters": {\n'
        '            "type": "object",\n            "properties": {\n'
        '                "city": {\n                    "type": "string"\n                }\n'
        '            },\n            "required": [\n                "city"\n            ]\n'
        "        }\n    }\n}\n\n"
        "Weather in Paris and Oslo?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"18°C"<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"4°C"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama31_without_tools_matches_the_shipped_template():
    turns = (Turn("system", "Be brief."), Turn("user", "Hi"))
    template = ChatTemplate.load(TEMPLATES / "llama3.jinja")
    expected = template.render([Message(t.role, t.content) for t in turns])
    assert render(Family.LLAMA3_JSON, turns, [], template.render) == expected


def test_llama31_tools_need_a_user_message():
    with pytest.raises(MeshError) as caught:
        render(Family.LLAMA3_JSON, (Turn("system", "x"),), [WEATHER], lambda m: "")
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "messages"


# SmolLM2-Instruct's template: ChatML with its own default system prompt.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
           "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_generic_format_through_the_models_own_template():
    template = ChatTemplate(SMOLLM2)
    assert family_of(SMOLLM2) is Family.GENERIC
    text = render(Family.GENERIC, CONVERSATION, [WEATHER], template.render)
    # No default system prompt of ours: the tools block is the system prompt.
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert WEATHER_JSON in text
    assert "<|im_start|>user\n<tool_response>\n18°C\n</tool_response>\n<tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Without tools, earlier calls still render (a conversation that stopped offering them).
    bare = render(Family.GENERIC, CONVERSATION, [], template.render)
    assert "# Tools" not in bare and '"arguments": {"city": "Oslo"}' in bare
    assert bare.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
