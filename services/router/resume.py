"""Resuming a stream on another replica when the one serving it fails.

When a stream breaks after its first text (the engine or the adapter died,
the connection was reset, or the adapter reported INCOMPLETE_GENERATION),
the router sends the same request to another replica with the text relayed
so far as the start of the model's answer (a last assistant message, which
the adapter renders as the chat template's open assistant turn followed by
the text verbatim; `raw` requests get it appended to their input) and the
rest of the token budget, and relays the continuation on the same stream.

The seam: the continuation starts exactly after the text the client has
seen, byte for byte; nothing is held back, cut or repeated. The engine
tokenizes that text again, so the tokens before the seam may split
differently than the ones the model produced (rare for the text a model
writes, which its tokenizer splits the way it would have); a token whose
text was not yet complete (part of a multi-byte character, which engines
hold back) is generated again. Token counts add up from the client's side:
the final `tokens` is the tokens relayed before the seam plus the
continuation's, and `input_tokens` is the continuation's prompt less the
tokens relayed before the seam.

A stop sequence the seam splits (its first characters relayed before the
break, the rest generated after) is one no engine sees whole: each matches
its own output only. `SeamStop` watches the continuation's first characters
for it; where one ends, the router ends the stream there, as the engine
would have (the stop sequence ends the text, TGI's way).

Deterministic requests (greedy decoding) resume by default: their
continuation is what the broken replica would have produced. Sampled ones
resume only on opt-in (ResumePolicy ALLOW, `x-llmmesh-resume: allow`), as
their continuation is a new sample; NEVER turns resuming off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from services.common.errors import MeshError
from services.common.types import (
    RAW_SCENARIO,
    GenerationRequest,
    Message,
    Parameters,
    ResumePolicy,
)

DEFAULT_MAX_RESUMES = 2


def allowed(request: GenerationRequest, effective: Parameters) -> bool:
    """Whether the request's policy lets its stream resume (`effective`: its
    parameters with the model's defaults)."""
    if request.resume is ResumePolicy.NEVER:
        return False
    return request.resume is ResumePolicy.ALLOW or not effective.sampling


def resumable(error: MeshError) -> bool:
    """Whether `error` broke the stream in a way another replica can mend:
    a replica, its engine or the connection to it went away."""
    return error.code == "UNAVAILABLE"


def continuation(forward: GenerationRequest, text: str, max_new_tokens: int) -> GenerationRequest:
    """The request that continues `forward` after `text`, within `max_new_tokens`."""
    parameters = replace(forward.parameters, max_new_tokens=max_new_tokens)
    if forward.scenario == RAW_SCENARIO and not forward.messages:
        return forward.evolve(inputs=forward.inputs + text, parameters=parameters)
    return forward.evolve(
        messages=(*forward.messages, Message("assistant", text)), parameters=parameters
    )


class SeamStop:
    """Finds a stop sequence that began in the text relayed before a seam
    and ends in the continuation after it."""

    def __init__(self, before: str, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if len(s) > 1)
        reach = max((len(s) - 1 for s in self._stops), default=0)
        self._tail = before[-reach:] if reach else ""
        self._after = ""  # the continuation so far, while a stop may still span the seam

    @property
    def done(self) -> bool:
        """No stop sequence can span the seam any more."""
        return not self._tail or len(self._after) >= len(self._tail)

    def feed(self, text: str) -> int | None:
        """The continuation's next `text`: how many of its characters to relay
        when a stop sequence that began before the seam ends in it (None: no
        such stop sequence ended)."""
        if self.done:
            return None
        seen = len(self._tail) + len(self._after)
        window = self._tail + self._after + text
        ends = [
            start + len(stop)
            for stop in self._stops
            for start in range(max(len(self._tail) - len(stop) + 1, 0), len(self._tail))
            if start + len(stop) > seen and window.startswith(stop, start)
        ]
        self._after += text
        return min(ends) - seen if ends else None
