"""Which KV slot a new sequence takes, and which tokens each slot still holds.

Prefix caching as TGI 3 and llama.cpp's server do it: a finished sequence
leaves its KV cells in its slot; a new request takes the free slot whose
cached tokens share the longest prefix with its prompt, and only the rest
of the prompt is prefilled. At least the prompt's last two tokens are
always evaluated: the last one's logits give the first generated token, and
llama.cpp computes a one-token batch with other kernels than a longer one,
whose results differ in the last bits, enough to change a near-tie and so
make output depend on a cache hit.

Slot choice follows llama-server (`get_available_slot`): a slot is a
candidate only when the shared prefix covers more than `MIN_SIMILARITY` of
what the slot holds, so a request sharing a short chat-template head with a
long cached conversation does not evict it; among candidates the longest
shared prefix wins (ties: least recently used); with no candidate, the
least recently used free slot is taken (never-used slots first, lowest
index first). With caching off, the lowest free slot is taken and nothing
is reused, so the running slots stay contiguous from 0.

Pure bookkeeping: no llama.cpp, no threads (the scheduler's engine thread
owns the table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

# llama-server's default --slot-prompt-similarity.
MIN_SIMILARITY: Final = 0.1
# Prompt tokens always evaluated, cached or not (see the module's docstring).
MIN_EVALUATED: Final = 2


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Binary search over slice comparisons (done in C), so a 2,000-token
    lookup costs about a dozen list compares instead of a Python loop.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Slot:
    # Tokens whose KV cells the slot holds, in position order.
    tokens: list[int] = field(default_factory=list)
    # When the slot was last released (a tick of the table's clock); -1: never.
    last_used: int = -1
    busy: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A slot handed to a new sequence."""

    slot: int
    # Leading prompt tokens whose KV cells the slot already holds.
    reused: int


class SlotTable:
    """The KV slots of one llama.cpp context: who runs where, what is cached."""

    def __init__(self, slots: int, *, enabled: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.enabled = enabled
        self._slots = [_Slot() for _ in range(slots)]
        self._clock = 0

    @property
    def size(self) -> int:
        return len(self._slots)

    def free(self) -> int:
        """How many slots no sequence is using."""
        return sum(1 for s in self._slots if not s.busy)

    def cached(self, slot: int) -> list[int]:
        """The tokens `slot` holds (a copy)."""
        return list(self._slots[slot].tokens)

    def acquire(self, prompt: Sequence[int]) -> Lease:
        """Take a free slot for `prompt`; raises LookupError when none is free."""
        if not self.enabled:
            for i, s in enumerate(self._slots):
                if not s.busy:
                    s.busy = True
                    s.tokens = []
                    return Lease(i, 0)
            raise LookupError("no free slot")
        best = -1
        best_len = 0
        oldest = -1
        for i, s in enumerate(self._slots):
            if s.busy:
                continue
            if oldest < 0 or s.last_used < self._slots[oldest].last_used:
                oldest = i
            if not s.tokens:
                continue
            shared = common_prefix(s.tokens, prompt)
            if shared <= MIN_SIMILARITY * len(s.tokens):
                continue
            if shared > best_len or (
                shared == best_len and s.last_used < self._slots[best].last_used
            ):
                best, best_len = i, shared
        if oldest < 0:
            raise LookupError("no free slot")
        if best < 0:
            best, best_len = oldest, 0
        slot = self._slots[best]
        slot.busy = True
        reused = max(min(best_len, len(prompt) - MIN_EVALUATED), 0)
        # Until release, the slot holds the reused part only (the rest is trimmed).
        del slot.tokens[reused:]
        return Lease(best, reused)

    def release(self, slot: int, tokens: Sequence[int]) -> None:
        """`slot` is free again, holding the KV of `tokens` (nothing when caching is off)."""
        s = self._slots[slot]
        s.busy = False
        s.tokens = list(tokens) if self.enabled else []
        self._clock += 1
        s.last_used = self._clock

    def shrink(self, slot: int, keep: int) -> None:
        """The slot holds fewer tokens than recorded (a trim llama.cpp refused)."""
        del self._slots[slot].tokens[keep:]
