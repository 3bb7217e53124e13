"""What to send: prompts and output lengths from a distribution or a JSONL file.

A distribution is `fixed:N` or `uniform:LOW:HIGH` (inclusive). Generated
prompts are common English words, about one token each for the BPE
tokenizers of Qwen2, Llama 3 and SmolLM2, so `--input-tokens fixed:256`
sends a prompt of roughly 256 tokens (the server's own count is reported).

A dataset is a JSONL file, one request per line:
    {"prompt": "...", "output_tokens": 128, "model": "qwen2", "scenario": "qa"}
`output_tokens` is the `max_new_tokens` / `max_tokens` sent (a line without
it takes one from --output-tokens); `model` and `scenario` are optional and
override the command line's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SYNTHETIC = Path(__file__).resolve().parent / "data" / "synthetic.jsonl"

WORDS = (
    "the of and to in is was for on that with as by at from this be are it an or "
    "which have not has but all were when there can been one more their new also "
    "time first would about other into after many year people may only most over "
    "such some these work city water system world state part use how each between "
    "number day made where later under while during because high small long large "
    "early life group through school house family light power music river game "
    "history market country company science story model plan change place point"
).split()


@dataclass(frozen=True)
class Item:
    """One request to send: `prompt`, or a conversation in `messages` (role,
    content) whose last turn is the user's `prompt`."""

    prompt: str
    max_tokens: int
    model: str | None = None
    scenario: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    turn: int | None = None  # 1, 2, ... in a conversation of the shared-prefix workload

    def chat(self) -> list[dict[str, str]]:
        """The conversation as OpenAI and llmmesh take it."""
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class Distribution:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Distribution:
        """`fixed:N` or `uniform:LOW:HIGH`; a bare number means fixed."""
        kind, _, rest = text.partition(":")
        try:
            if not rest:
                n = int(kind)
                low = high = n
            elif kind == "fixed":
                low = high = int(rest)
            elif kind == "uniform":
                a, _, b = rest.partition(":")
                low, high = int(a), int(b)
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(
                f"{text!r}: expected fixed:N, uniform:LOW:HIGH or a number") from None
        if low < 1 or high < low:
            raise ValueError(f"{text!r}: need 1 <= LOW <= HIGH")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"fixed:{self.low}" if self.low == self.high else f"uniform:{self.low}:{self.high}"


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of text, asking for a long answer."""
    head = "Continue this text for as long as you can:"
    body = " ".join(rng.choice(WORDS) for _ in range(max(1, tokens - 9)))
    return f"{head} {body}"


def load_dataset(path: Path, output_tokens: Distribution | None = None,
                 seed: int = 0) -> list[Item]:
    """The requests of a JSONL dataset; a clear error names the bad line.

    A line without `output_tokens` takes a length from `output_tokens` (the
    --output-tokens option), sampled with `seed`; without it the line is an error.
    """
    rng = random.Random(seed)
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the dataset: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            for name in ("prompt",) if output_tokens else ("prompt", "output_tokens"):
                if name not in row:
                    raise ValueError(f"missing field {name!r}")
            prompt = row["prompt"]
            out = (int(row["output_tokens"]) if "output_tokens" in row
                   else output_tokens.sample(rng) if output_tokens else 0)
            if not isinstance(prompt, str) or not prompt.strip() or out < 1:
                raise ValueError("needs a non-empty prompt and output_tokens >= 1")
            items.append(Item(prompt, out, row.get("model"), row.get("scenario")))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    if not items:
        raise ValueError(f"{path}: no requests")
    return items


@dataclass(frozen=True)
class SharedPrefix:
    """Conversations that share long beginnings, as chat and agent traffic does
    (the shape of vLLM's prefix-repetition and multi-turn benchmark datasets).

    `prefixes` system prompts of `prefix_tokens` tokens each; `conversations`
    conversations (conversation c opens with system prompt c mod `prefixes`),
    each of `turns` turns. A turn adds a user message of `suffix_tokens`
    tokens; from the second turn on the conversation so far comes first (the
    earlier user messages, each followed by a stand-in assistant reply of the
    turn's output length), so every turn's prompt extends the one before it.
    Tokens are approximated by words of WORDS (about one token each for the
    BPE tokenizers of Qwen2, Llama 3 and SmolLM2); the servers' own counts are
    reported. The stand-in replies are not the model's answers: an engine's
    cache holds the previous prompt, not the reply it generated.
    """

    prefixes: int
    prefix_tokens: int = 1000
    turns: int = 4
    suffix_tokens: int = 32
    conversations: int | None = None  # default: one per prefix

    def __post_init__(self) -> None:
        if self.prefixes < 1 or self.prefix_tokens < 1 or self.turns < 1:
            raise ValueError("--prefixes, --prefix-tokens and --turns must be >= 1")
        if self.suffix_tokens < 1:
            raise ValueError("--suffix-tokens must be >= 1")
        if self.conversations is not None and self.conversations < 1:
            raise ValueError("--conversations must be >= 1")

    @property
    def n_conversations(self) -> int:
        return self.conversations or self.prefixes

    def describe(self) -> dict[str, int]:
        return {"prefixes": self.prefixes, "prefix_tokens": self.prefix_tokens,
                "turns": self.turns, "suffix_tokens": self.suffix_tokens,
                "conversations": self.n_conversations}


def _words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def shared_prefix_items(
    spec: SharedPrefix, models: Sequence[str], output_tokens: Distribution,
    scenario: str | None, seed: int,
) -> Iterator[Item]:
    """Endless turns of `spec`'s conversations. Conversations advance together:
    every conversation's turn t is sent before any conversation's turn t + 1,
    so at a concurrency up to the number of conversations a turn is sent after
    the one before it has (usually) been answered. After the last turn, a new
    round of conversations begins over the same system prompts."""
    rng = random.Random(seed)
    prompts = [f"You are assistant number {k}. Keep to these notes: "
               + _words(max(1, spec.prefix_tokens - 10), rng) for k in range(spec.prefixes)]
    while True:
        chats: list[list[tuple[str, str]]] = [
            [("system", prompts[c % spec.prefixes])] for c in range(spec.n_conversations)]
        for turn in range(1, spec.turns + 1):
            for c, chat in enumerate(chats):
                user = _words(spec.suffix_tokens, rng)
                out = output_tokens.sample(rng)
                model = models[c % len(models)]
                yield Item(user, out, model, scenario, (*chat, ("user", user)), turn)
                chat += [("user", user), ("assistant", _words(out, rng))]


class Workload:
    """An endless, seeded sequence of requests, spread over the models in turn."""

    def __init__(
        self,
        models: Sequence[str],
        *,
        dataset: Sequence[Item] | None = None,
        input_tokens: Distribution = Distribution(128, 128),
        output_tokens: Distribution = Distribution(128, 128),
        scenario: str | None = None,
        seed: int = 0,
        shared_prefix: SharedPrefix | None = None,
    ) -> None:
        if not models:
            raise ValueError("at least one model")
        self.shared_prefix = shared_prefix
        self.models = list(models)
        self.dataset = list(dataset) if dataset else None
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.scenario = scenario
        self.seed = seed

    def items(self) -> Iterator[Item]:
        if self.shared_prefix is not None:
            yield from shared_prefix_items(self.shared_prefix, self.models, self.output_tokens,
                                           self.scenario, self.seed)
            return
        rng = random.Random(self.seed)
        order: list[Item] = []
        i = 0
        while True:
            model = self.models[i % len(self.models)]
            if self.dataset is not None:
                if not order:
                    order = list(self.dataset)
                    rng.shuffle(order)
                item = order.pop()
                yield Item(item.prompt, item.max_tokens, item.model or model,
                           item.scenario or self.scenario)
            else:
                prompt = synthetic_prompt(self.input_tokens.sample(rng), rng)
                yield Item(prompt, self.output_tokens.sample(rng), model, self.scenario)
            i += 1

    def describe(self) -> dict[str, object]:
        if self.shared_prefix is not None:
            return {"models": self.models, "shared_prefix": self.shared_prefix.describe(),
                    "output_tokens": str(self.output_tokens), "scenario": self.scenario,
                    "seed": self.seed}
        if self.dataset is not None:
            return {"models": self.models, "dataset_requests": len(self.dataset),
                    "scenario": self.scenario, "seed": self.seed}
        return {"models": self.models, "input_tokens": str(self.input_tokens),
                "output_tokens": str(self.output_tokens), "scenario": self.scenario,
                "seed": self.seed}
