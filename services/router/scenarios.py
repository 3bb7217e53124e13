"""Scenario prompt templates (scenarios.yaml): a request's `scenario` turns its
text into the chat messages the model receives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.common.errors import FieldViolation, clip, invalid
from services.common.types import CHAT_SCENARIO, RAW_SCENARIO, GenerationRequest, Message

DEFAULT_FILE = Path(__file__).with_name("scenarios.yaml")
DEFAULT_SCENARIO = CHAT_SCENARIO
RAW = RAW_SCENARIO
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Scenario:
    name: str
    user: str = "{inputs}"
    system: str | None = None

    def messages(self, inputs: str) -> tuple[Message, ...]:
        # replace(), not format(): braces in the template or the text stay as they are.
        user = Message("user", self.user.replace("{inputs}", inputs))
        return (Message("system", self.system), user) if self.system else (user,)


class Scenarios:
    def __init__(self, scenarios: dict[str, Scenario]) -> None:
        self._by_name = scenarios

    @property
    def names(self) -> tuple[str, ...]:
        return (*self._by_name, RAW)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name or name == RAW

    def apply(self, request: GenerationRequest, model_id: str | None = None) -> GenerationRequest:
        """The request as the adapter receives it: chat messages, or raw text,
        for the model `model_id` (default: the one it names)."""
        name = request.scenario or DEFAULT_SCENARIO
        model_id = request.model_id if model_id is None else model_id
        if name == RAW:
            if request.messages:
                raise invalid([FieldViolation("messages", "the raw scenario takes `inputs` only")])
            return request.evolve(scenario=RAW, model_id=model_id)
        scenario = self._by_name.get(name)
        if scenario is None:
            raise invalid([
                FieldViolation(
                    "scenario",
                    f"unknown scenario {clip(name)!r}; known: {', '.join(self.names)}",
                )
            ])
        if request.messages:
            messages = request.messages
            if scenario.system and messages[0].role != "system":
                messages = (Message("system", scenario.system), *messages)
        else:
            messages = scenario.messages(request.inputs)
        return request.evolve(scenario=DEFAULT_SCENARIO, inputs="", messages=messages,
                              model_id=model_id)


def load_scenarios(path: str | Path = DEFAULT_FILE) -> Scenarios:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read scenarios from {p}: {exc}") from exc
    entries = (raw or {}).get("scenarios")
    if not isinstance(entries, dict) or not entries:
        raise SystemExit(f"{p}: expected a `scenarios:` mapping")
    out: dict[str, Scenario] = {}
    for name, body in entries.items():
        if not _NAME.match(str(name)) or name == RAW:
            raise SystemExit(f"{p}: bad scenario name {name!r}")
        body = body or {}
        user = str(body.get("user", "{inputs}"))
        if "{inputs}" not in user:
            raise SystemExit(f"{p}: scenario {name!r}: `user` must contain {{inputs}}")
        system = body.get("system")
        out[name] = Scenario(name=name, user=user, system=str(system) if system else None)
    return Scenarios(out)
