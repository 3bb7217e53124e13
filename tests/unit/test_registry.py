"""The model registry."""

from pathlib import Path

import pytest

from services.common.registry import load_registry

REGISTRY = Path(__file__).parents[2] / "models" / "registry.yaml"


def test_shipped_registry_defaults():
    registry = load_registry(REGISTRY, env={})
    assert [m.id for m in registry.models] == ["qwen2", "llama3"]
    assert registry.get("qwen2").name == "Qwen2-7B-Instruct-GPTQ-Int4"
    assert registry.get("llama3").name == "Llama-3.1-8B-Instruct-GPTQ-INT4"
    assert registry.get("qwen2").adapters == ("127.0.0.1:50061",)
    for model in registry.models:
        assert model.chat_template is not None and model.chat_template.is_file()


def test_aliases_and_names_are_case_insensitive():
    registry = load_registry(REGISTRY, env={})
    assert registry.get("QWEN2").id == "qwen2"
    assert registry.get("Llama-3.1-8B-Instruct-GPTQ-INT4").id == "llama3"
    assert registry.find("gpt-4") is None


def test_environment_sets_addresses():
    env = {"QWEN2_ADAPTERS": "a:1, b:2", "LLAMA3_ADAPTERS": "dns:///adapter-llama3:50061"}
    registry = load_registry(REGISTRY, env=env)
    assert registry.get("qwen2").adapters == ("a:1", "b:2")
    assert registry.get("llama3").adapters == ("dns:///adapter-llama3:50061",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: 3", "models"),
        ("models:\n  - {id: a}\n", "id and a name"),
        ("models:\n  - {id: a, name: A, limits: {max_tokens: 3}}\n", "unknown keys"),
        ("models:\n  - {id: a, name: A}\n  - {id: b, name: A}\n", "used by"),
        ("models:\n  - {id: a, name: '${NOPE}'}\n", "NOPE"),
    ],
)
def test_bad_registries_are_refused(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        load_registry(path, env={})
