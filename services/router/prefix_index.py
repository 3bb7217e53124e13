"""What each replica's engine probably holds in its prefix cache.

Engines keep the KV cache of prompts they have computed (vLLM and TGI 3 in
blocks of tokens, llama.cpp's server per slot) and skip the prefill of a
prefix they still hold. The router cannot see those caches, so it keeps an
approximate copy per replica, as llm-d's approximate prefix scorer and
SGLang's router do: the request's canonical text is cut into blocks of
`block_chars` characters (no tokenizer, so it works for every engine kind),
each block's hash chains the previous one's (a block only matches when
everything before it matches too), and each replica has a bounded index of
the block hashes of the requests sent to it, least recently used first.

A request's match on a replica is the number of its leading blocks found in
that replica's index; only whole blocks count, as only whole blocks are
reused by a block-based engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b

from services.common.types import GenerationRequest

# About 64 tokens of English text (llm-d clamps its block up to 64 tokens).
BLOCK_CHARS = 256
# Blocks per replica: 16,384 x 256 characters is about a million tokens, the
# order of an engine's KV cache; about 2 MB of index per replica.
CAPACITY_BLOCKS = 16_384
# ASCII unit and record separators between fields, so that "ab"+"c" and
# "a"+"bc" differ (control characters that chat text hardly ever holds).
_FIELD = "\x1f"
_RECORD = "\x1e"


def canonical_text(request: GenerationRequest) -> str:
    """The request's text in the order an engine's prompt holds it.

    The scenario (whose system prompt the adapter puts first), then every
    message as role and content in order (the system message and any tool
    definitions rendered into it come first), then the raw inputs. Two
    requests share a prefix of this text exactly when they share the
    beginning of their conversation, which is when the engine's rendered
    prompts share a prefix too.
    """
    parts = [request.scenario, _RECORD]
    for message in request.messages:
        parts += (message.role, _FIELD, message.content, _RECORD)
    parts.append(request.inputs)
    return "".join(parts)


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of the whole blocks of `text` (a short tail is left out)."""
    data = text.encode("utf-8", "surrogatepass")
    # Blocks of characters, hashed as UTF-8: cut on the text, not the bytes,
    # so a block boundary never splits a character.
    if len(data) != len(text):
        blocks = [
            text[i : i + block_chars].encode("utf-8", "surrogatepass")
            for i in range(0, len(text) - block_chars + 1, block_chars)
        ]
    else:
        blocks = [
            data[i : i + block_chars] for i in range(0, len(data) - block_chars + 1, block_chars)
        ]
    out: list[bytes] = []
    previous = b""
    for block in blocks:
        previous = blake2b(previous + block, digest_size=8).digest()
        out.append(previous)
    return out


class PrefixIndex:
    """One replica's block hashes, bounded, least recently used evicted first."""

    def __init__(self, capacity: int = CAPACITY_BLOCKS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least one block")
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` the index holds."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> None:
        """Record that the replica computed these blocks, most recent use now.

        The last block is touched first and the first block last, so a
        prefix is always more recent than its continuations and eviction
        takes the tails of conversations first, as engines do (vLLM frees a
        request's blocks tail first; a shared system prompt outlives them).
        """
        blocks = self._blocks
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
