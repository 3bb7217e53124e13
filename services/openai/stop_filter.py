"""Stop sequences as OpenAI means them: the matched sequence is not returned.

Engines that speak TGI's API stop at a stop sequence and return it as the
end of the text; OpenAI and vLLM leave it out. `StopFilter` cuts the text at
the first stop sequence, whole or streamed: it holds back only the end of the
text that could still begin a stop sequence, so a streamed answer adds up to
the unstreamed one. The native API keeps TGI's behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could begin a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _first_match(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop sequence that completes first (as an engine sees it, token by
    token), and where it starts; of two that end together, the longer."""
    found: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at < 0:
            continue
        if found is None or (at + len(stop), at) < (found[0] + len(found[1]), found[0]):
            found = (at, stop)
    return found


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The text before the first stop sequence to complete, and that sequence
    (None: none)."""
    found = _first_match(text, [s for s in stops if s])
    return (text, None) if found is None else (text[:found[0]], found[1])


class StopFilter:
    """Feed streamed text; send what `feed` returns, then what `finish` returns."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        """A stop sequence was seen: everything after it is dropped."""
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        text = self._held + text
        found = _first_match(text, self._stops)
        if found is not None:
            self._held = ""
            self.matched = found[1]
            return text[:found[0]]
        keep = _held(text, self._stops)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        """The end of the output: held text was not a stop sequence after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
