"""Tenants: who may call the mesh, with which keys, for which models, how much.

The tenants file (YAML):

    tenants:
      - name: search
        keys: [sk-search-1]            # or key_sha256: [<hex>]
        models: [qwen2]                # default: every model
        priority: interactive          # interactive | standard (default) | batch
        max_priority: interactive      # the highest band it may ask for (default: priority)
        weight: 1                      # fair share within a band (default 1)
        admin: false                   # may read every tenant's usage
        limits: {requests_per_minute: 600, tokens_per_minute: 20000,
                 tokens_per_day: 1000000, concurrent: 16}

Every field but `name` and `keys` (or `key_sha256`) is optional; a limit not
given is no limit. Keys are hashed (SHA-256) as the file is read and only the
digests are kept. Every error names the file and line.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import MeshError, Reason, clip
from services.tenancy.priority import NAMES as PRIORITY_NAMES
from services.tenancy.priority import Priority

# Tenant names become metric label values: short and plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_SCHEME = "bearer "

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "concurrent")
TENANT_FIELDS = (
    "name", "keys", "key_sha256", "models", "priority", "max_priority", "weight", "admin",
    "limits",
)


def digest(key: str) -> bytes:
    """The SHA-256 digest a key is known by."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's budgets; None is no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in LIMIT_FIELDS)

    def scaled(self, share: float) -> TenantLimits:
        """These limits times `share` (at least 1 where a limit is set)."""
        def part(value: int | None) -> int | None:
            return None if value is None else max(1, int(value * share))

        return TenantLimits(*(part(getattr(self, name)) for name in LIMIT_FIELDS))


@dataclass(frozen=True)
class Tenant:
    name: str
    # None: every model; otherwise canonical model ids.
    models: frozenset[str] | None = None
    priority: Priority = Priority.STANDARD
    # The most urgent band it may ask for; None: its own priority.
    max_priority: Priority | None = None
    weight: float = 1.0
    admin: bool = False
    limits: TenantLimits = field(default_factory=TenantLimits)

    @property
    def cap(self) -> Priority:
        return self.priority if self.max_priority is None else self.max_priority

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def check_model(self, model_id: str) -> None:
        """Raise MODEL_NOT_ALLOWED (PERMISSION_DENIED) unless the tenant may use the model."""
        if not self.allows(model_id):
            raise MeshError(
                Reason.MODEL_NOT_ALLOWED,
                f"this API key may not use model {clip(model_id)!r}",
                metadata={"model_id": clip(model_id), "tenant": self.name},
            )


# The tenant of a mesh that has no keys at all: no limits, standard priority.
ANONYMOUS = Tenant("anonymous")


class TenantsFileError(ValueError):
    """A tenants file that cannot be used, with the file and line at fault."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class Tenants:
    """An immutable set of tenants, looked up by key digest or by name."""

    tenants: tuple[Tenant, ...]
    # Key digest -> tenant; never printed (a digest identifies a key).
    by_digest: Mapping[bytes, Tenant] = field(repr=False)
    source: str = ""
    _by_name: dict[str, Tenant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tenants})

    def __len__(self) -> int:
        return len(self.tenants)

    def named(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def by_key(self, key: str) -> Tenant | None:
        """The tenant holding `key`. A dict lookup of the key's digest: the time
        taken depends on the digest, never on how much of a key was right."""
        return self.by_digest.get(digest(key))

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant of the `authorization: Bearer <key>` metadata; UNAUTHENTICATED
        when it is missing or holds the key of no tenant."""
        header = next(
            (v for k, v in metadata or () if k == "authorization" and isinstance(v, str)), None
        )
        if header is None:
            raise MeshError(
                Reason.UNAUTHENTICATED,
                "an API key is required: send `Authorization: Bearer <key>`",
            )
        if header[: len(_SCHEME)].lower() != _SCHEME:
            raise MeshError(
                Reason.UNAUTHENTICATED, "the Authorization header must be `Bearer <key>`"
            )
        tenant = self.by_key(header[len(_SCHEME):].strip())
        if tenant is None:
            raise MeshError(Reason.UNAUTHENTICATED, "the API key is not valid")
        return tenant


def tenants_from_keys(keys: Iterable[str], source: str = "API keys") -> Tenants:
    """Plain API keys (API_KEYS_FILE): every key a tenant without limits, named
    `key-1`, `key-2`, ... in the order given (names never hold key material)."""
    tenants: list[Tenant] = []
    index: dict[bytes, Tenant] = {}
    for key in keys:
        if not key or digest(key) in index:
            continue
        tenant = Tenant(f"key-{len(tenants) + 1}")
        tenants.append(tenant)
        index[digest(key)] = tenant
    if not tenants:
        raise ValueError("no API keys given")
    return Tenants(tuple(tenants), index, source)


def tenants_from_key_file(file: str | Path | None, env_value: str | None) -> Tenants | None:
    """The API keys file (one key per line, `#` comments) and/or a comma-separated
    value, as tenants without limits; None when neither is set (no keys: the
    mesh is open). Exits naming the file when it cannot be used."""
    keys: list[str] = []
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TenantsFileError(str(file), None, f"cannot read: {exc}") from exc
        keys = [line.strip() for line in text.splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        if not keys:
            raise TenantsFileError(str(file), None, "holds no key")
    if env_value:
        keys += [k.strip() for k in env_value.split(",") if k.strip()]
    return tenants_from_keys(keys, str(file or "LLMMESH_API_KEYS")) if keys else None


def load_tenants(
    path: str | Path, canonical_model: Callable[[str], str | None] | None = None
) -> Tenants:
    """Read a tenants file; TenantsFileError (file and line) on any fault.

    `canonical_model` turns a model name (id, name or alias) into the model's
    id, or None for a model the mesh does not serve.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TenantsFileError(name, None, f"cannot read: {exc}") from exc
    return parse_tenants(text, name, canonical_model)


def parse_tenants(
    text: str, source: str = "<tenants>",
    canonical_model: Callable[[str], str | None] | None = None,
) -> Tenants:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise TenantsFileError(source, line, f"not valid YAML: {problem}") from exc
    return _Reader(source, canonical_model).tenants(root)


class _Reader:
    """Walks the YAML node tree, so every fault can name its line."""

    def __init__(self, source: str, canonical_model: Callable[[str], str | None] | None) -> None:
        self.source = source
        self.canonical_model = canonical_model

    def fail(self, node: yaml.Node | None, message: str) -> TenantsFileError:
        line = node.start_mark.line + 1 if node is not None else None
        return TenantsFileError(self.source, line, message)

    def mapping(self, node: yaml.Node, what: str, allowed: Sequence[str]) -> dict[str, Any]:
        """A mapping's values (nodes) by key; unknown keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else ""
            if key not in allowed:
                # Named only when it is a near miss of a known field: a key
                # pasted in the wrong place must not reach the log.
                near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
                named = f"unknown field {key!r} (did you mean {near[0]!r}?)" if near else (
                    "an unknown field"
                )
                raise self.fail(key_node, f"{named} in {what}; known: {', '.join(allowed)}")
            if key in out:
                raise self.fail(key_node, f"{what} gives {key!r} twice")
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            # Not quoted: the value may be a key.
            raise self.fail(node, f"{what} is not a valid value (quote it)") from exc
        finally:
            loader.dispose()

    def strings(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        items = node.value if isinstance(node, yaml.SequenceNode) else None
        if items is None:
            raise self.fail(node, f"{what} must be a list")
        out = []
        for item in items:
            value = self.scalar(item, what)
            if not isinstance(value, str) or not value:
                raise self.fail(item, f"every entry of {what} must be a non-empty string")
            out.append((value, item))
        return out

    def tenants(self, root: yaml.Node | None) -> Tenants:
        if root is None:
            raise self.fail(None, "the file is empty; it needs `tenants:` with a list")
        top = self.mapping(root, "the file", ("tenants",))
        if "tenants" not in top:
            raise self.fail(root, "the file needs `tenants:` with a list")
        items = top["tenants"]
        if not isinstance(items, yaml.SequenceNode) or not items.value:
            raise self.fail(items, "`tenants` must be a non-empty list")
        tenants: list[Tenant] = []
        index: dict[bytes, Tenant] = {}
        names: set[str] = set()
        for node in items.value:
            tenant, digests = self.tenant(node)
            if tenant.name in names:
                raise self.fail(node, f"tenant {tenant.name!r} is given twice")
            names.add(tenant.name)
            for value, key_node in digests:
                if value in index:
                    raise self.fail(
                        key_node,
                        f"tenant {tenant.name!r} has a key that tenant "
                        f"{index[value].name!r} has too",
                    )
                index[value] = tenant
            tenants.append(tenant)
        return Tenants(tuple(tenants), index, self.source)

    def tenant(self, node: yaml.Node) -> tuple[Tenant, list[tuple[bytes, yaml.Node]]]:
        f = self.mapping(node, "a tenant", TENANT_FIELDS)
        if "name" not in f:
            raise self.fail(node, "a tenant needs a `name`")
        name = self.scalar(f["name"], "name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.fail(
                f["name"], "name must be 1-64 letters, digits, '_', '.' or '-' "
                "(it labels metrics)",
            )
        what = f"tenant {name!r}"
        digests: list[tuple[bytes, yaml.Node]] = []
        if "keys" in f:
            digests += [(digest(k), n) for k, n in self.strings(f["keys"], f"{what}: keys")]
        if "key_sha256" in f:
            for value, n in self.strings(f["key_sha256"], f"{what}: key_sha256"):
                if not _HEX.match(value):
                    raise self.fail(n, f"{what}: key_sha256 entries are 64 hex digits")
                digests.append((bytes.fromhex(value), n))
        if not digests:
            raise self.fail(node, f"{what} needs `keys` or `key_sha256` with at least one key")
        models: frozenset[str] | None = None
        if "models" in f:
            ids = []
            for model, n in self.strings(f["models"], f"{what}: models"):
                known = self.canonical_model(model) if self.canonical_model else model
                if known is None:
                    raise self.fail(n, f"{what}: unknown model {model!r}")
                ids.append(known)
            models = frozenset(ids)
        priority = self.priority(f.get("priority"), f"{what}: priority", Priority.STANDARD)
        cap = self.priority(f.get("max_priority"), f"{what}: max_priority", priority)
        if cap > priority:
            raise self.fail(
                f["max_priority"],
                f"{what}: max_priority ({cap.label}) is below its priority ({priority.label})",
            )
        weight = 1.0
        if "weight" in f:
            weight = self.scalar(f["weight"], f"{what}: weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                0 < weight <= 1000
            ):
                raise self.fail(f["weight"], f"{what}: weight must be a number in (0, 1000]")
        admin = False
        if "admin" in f:
            admin = self.scalar(f["admin"], f"{what}: admin")
            if not isinstance(admin, bool):
                raise self.fail(f["admin"], f"{what}: admin must be true or false")
        limits = self.limits(f["limits"], what) if "limits" in f else TenantLimits()
        tenant = Tenant(
            name=name, models=models, priority=priority, max_priority=cap,
            weight=float(weight), admin=admin, limits=limits,
        )
        return tenant, digests

    def priority(self, node: yaml.Node | None, what: str, default: Priority) -> Priority:
        if node is None:
            return default
        value = self.scalar(node, what)
        parsed = Priority.parse(value) if isinstance(value, str) else None
        if parsed is None:
            raise self.fail(node, f"{what} must be one of {', '.join(PRIORITY_NAMES)}")
        return parsed

    def limits(self, node: yaml.Node, what: str) -> TenantLimits:
        f = self.mapping(node, f"{what}: limits", LIMIT_FIELDS)
        values: dict[str, int] = {}
        for key, value_node in f.items():
            value = self.scalar(value_node, f"{what}: limits.{key}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.fail(value_node, f"{what}: limits.{key} must be a whole number >= 1")
            values[key] = value
        return TenantLimits(**values)
