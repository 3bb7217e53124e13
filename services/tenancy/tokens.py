"""How many tokens a request reserves.

The exact count is the model's tokenizer over the rendered prompt (the
adapter renders it; TGI, vLLM and the CPU backend tokenize it). Where no
tokenizer can be reached, `upper_bound` is the stated estimate: the prompt's
UTF-8 bytes plus the tokens a tokenizer adds itself. Every token of a
byte-level BPE or byte-fallback SentencePiece vocabulary covers at least one
byte of text, so this never counts too few and a budget is never overrun;
it counts too many (about 4x for English), and settling gives the rest back.
"""

from __future__ import annotations

from collections.abc import Iterable

# Tokens a tokenizer may add to a text of its own accord (BOS, EOS, a prefix space).
ADDED_TOKENS = 2


def upper_bound(prompt: str) -> int:
    """At least as many tokens as the rendered `prompt` has, in any such vocabulary."""
    return len(prompt.encode("utf-8")) + ADDED_TOKENS


# Tokens a chat template may add around each message (role markers,
# separators), beyond the message's own text: generous for every template the
# mesh ships.
TEMPLATE_TOKENS_PER_MESSAGE = 16


def conversation_upper_bound(messages: Iterable[tuple[str, str]]) -> int:
    """At least as many tokens as a conversation of (role, content) has once a
    chat template has rendered it: each message's text, its role and room for
    the template's own tokens around it, and room for the assistant's turn."""
    return sum(
        upper_bound(content) + len(role) + TEMPLATE_TOKENS_PER_MESSAGE
        for role, content in messages
    ) + TEMPLATE_TOKENS_PER_MESSAGE


def reservation(input_tokens: int, max_new_tokens: int) -> int:
    """What a request reserves: its input and the most it may generate."""
    return max(0, input_tokens) + max(0, max_new_tokens)
