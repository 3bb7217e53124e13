"""The model registry (models/registry.yaml), read by the router and the adapters.

Values may use `${VAR}` or `${VAR:-default}`: the file is expanded from the
environment it is loaded in, so one registry serves the local mesh, docker
compose and Kubernetes, which differ only in addresses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from services.common import engine_kinds
from services.common.parameters import BUILTIN_DEFAULTS
from services.common.types import Limits, Parameters

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "models" / "registry.yaml"
_D = TypeVar("_D", Limits, Parameters)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# The engines an adapter can drive (services.common.engine_kinds), TGI first.
ENGINE_KINDS = engine_kinds.NAMES
CHAT_APIS = ("adapter", "engine")


@dataclass(frozen=True)
class EngineSpec:
    """The engine behind a model's adapters; adapter flags override each field."""

    # One of ENGINE_KINDS.
    kind: str = "tgi"
    # The engine's base URL (TGI: http://HOST:PORT; OpenAI kinds: .../v1).
    url: str = ""
    # The `model` an OpenAI-compatible engine serves ("" = its first listed).
    served_model: str = ""
    # Who renders the chat template: the adapter (prompts go to
    # /v1/completions) or the engine (conversations go to /v1/chat/completions).
    chat_api: str = "adapter"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    chat_template: Path | None = None
    limits: Limits = field(default_factory=Limits)
    # The parameter table's built-in defaults, under the registry's own.
    defaults: Parameters = BUILTIN_DEFAULTS
    engine: EngineSpec = field(default_factory=EngineSpec)
    # Requests one replica's engine batches well: the router's queue admits
    # this many per serving replica (None: the router's --slots-per-replica).
    slots: int | None = None
    # The router's choice of replica for this model; empty: the router's flag.
    replica_choice: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the model answers to."""
        return (self.id, self.name, *self.aliases)


@dataclass(frozen=True)
class Registry:
    models: tuple[ModelSpec, ...]
    # Every name, lower-cased, to its model: built once, read on every request.
    _by_name: dict[str, ModelSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, ModelSpec] = {}
        for model in self.models:
            for name in model.names:
                other = index.setdefault(name.lower(), model)
                if other is not model:
                    raise ValueError(f"the name {name!r} is used by {other.id} and {model.id}")
        object.__setattr__(self, "_by_name", index)

    def find(self, name: str) -> ModelSpec | None:
        """The model with this id, full name or alias (case-insensitive)."""
        return self._by_name.get(name.strip().lower())

    def get(self, model_id: str) -> ModelSpec:
        model = self.find(model_id)
        if model is None:
            raise KeyError(model_id)
        return model


def expand(text: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise SystemExit(f"registry: ${{{name}}} is not set and has no default")
        return default

    return _VAR.sub(sub, text)


def load_registry(path: str | Path, env: Mapping[str, str] | None = None) -> Registry:
    """Parse and check the registry; a bad file stops the service with a clear message."""
    p = Path(path)
    try:
        raw = yaml.safe_load(expand(p.read_text(encoding="utf-8"), env or os.environ))
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read the model registry {p}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise SystemExit(f"{p}: expected a top-level `models:` list")
    try:
        return Registry(tuple(_model(entry, p.parent) for entry in raw["models"]))
    except ValueError as exc:
        raise SystemExit(f"{p}: {exc}") from exc


def _model(entry: Any, base: Path) -> ModelSpec:
    if not isinstance(entry, dict) or not entry.get("id") or not entry.get("name"):
        raise SystemExit(f"registry: every model needs an id and a name, got {entry!r}")
    adapters = entry.get("adapters") or ()
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    template = entry.get("chat_template")
    slots = entry.get("slots")
    if slots is not None and (type(slots) is not int or slots < 1):
        raise SystemExit(f"registry: model {entry['id']}: slots must be a whole number >= 1")
    return ModelSpec(
        id=str(entry["id"]),
        name=str(entry["name"]),
        aliases=tuple(str(a) for a in entry.get("aliases") or ()),
        adapters=tuple(str(a) for a in adapters),
        chat_template=(base / template) if template else None,
        limits=_build(Limits, entry.get("limits"), entry["id"]),
        defaults=_build(Parameters, entry.get("defaults"), entry["id"]).with_defaults(
            BUILTIN_DEFAULTS),
        engine=_engine(entry.get("engine"), entry["id"]),
        slots=slots,
        replica_choice=str(entry.get("replica_choice") or ""),
    )


def _engine(values: Any, model: str) -> EngineSpec:
    values = dict(values or {})
    unknown = set(values) - {f.name for f in fields(EngineSpec)}
    if unknown:
        raise SystemExit(f"registry: model {model}: unknown engine keys {sorted(unknown)}")
    spec = EngineSpec(
        kind=str(values.get("kind") or "tgi"),
        url=str(values.get("url") or ""),
        served_model=str(values.get("served_model") or ""),
        chat_api=str(values.get("chat_api") or "adapter"),
    )
    if spec.kind not in ENGINE_KINDS:
        raise SystemExit(
            f"registry: model {model}: engine kind {spec.kind!r} is not one of "
            f"{', '.join(ENGINE_KINDS)}"
        )
    if spec.chat_api not in CHAT_APIS:
        raise SystemExit(
            f"registry: model {model}: chat_api must be one of {', '.join(CHAT_APIS)}"
        )
    if spec.kind == "tgi" and spec.chat_api != "adapter":
        raise SystemExit(f"registry: model {model}: TGI's API takes rendered prompts only")
    return spec


def _build(cls: type[_D], values: Any, model: str) -> _D:
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise SystemExit(f"registry: model {model}: unknown keys {sorted(unknown)}")
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    return cls(**values)
