"""The stated token estimate against a real tokenizer (the CPU backend's model):
it never counts fewer tokens than the tokenizer makes of the same prompt."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cpu_backend.settings import default_model_path
from services.tenancy.tokens import upper_bound

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenize():
    path = default_model_path()
    if path is None or not path.exists():
        pytest.skip("SmolLM2 GGUF missing: run scripts/install_llama_cpp.sh")
    from llama_cpp import Llama

    model = Llama(str(path), vocab_only=True, verbose=False)
    return lambda text: model.tokenize(text.encode("utf-8"), add_bos=True, special=True)


PROMPTS = [
    "",
    " ",
    "hello",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhé 😀 漢字<|im_end|>\n"
    "<|im_start|>assistant\n",
    "def f(x):\n\treturn x ** 2  # ünïcode\n" * 20,
    "\u200b\u200b\u200b",
    "a" * 1000,
    "🙂" * 50,
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bound_holds_on_known_prompts(tokenize, prompt):
    assert upper_bound(prompt) >= len(tokenize(prompt))


@settings(max_examples=300, deadline=None)
@given(prompt=st.text(max_size=400))
def test_bound_holds_on_any_text(tokenize, prompt):
    assert upper_bound(prompt) >= len(tokenize(prompt))
