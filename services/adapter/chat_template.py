"""The model's own chat template, rendered for TGI's raw-prompt API.

TGI's `/generate` applies no template, so the adapter renders the one the
model ships: `chat_template` from a Hugging Face `tokenizer_config.json`, the
`tokenizer.chat_template` metadata of a GGUF file, or a plain `.jinja` file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import MeshError, Reason
from services.common.types import Message


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self.source = source
        # The engine's tokenizer adds BOS itself, so templates that start
        # with {{ bos_token }} would double it: it renders empty by default.
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[Message]) -> str:
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except _TemplateRefused as exc:
            raise MeshError(Reason.INVALID_ARGUMENT, f"chat template: {exc}") from exc
        except TemplateError as exc:
            raise MeshError(Reason.INTERNAL, f"chat template failed: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate:
        """Load from a .jinja file, a tokenizer_config.json or a .gguf file."""
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"chat template not found: {p}")
        if p.suffix == ".gguf":
            meta = read_gguf_metadata(p, keys={"tokenizer.chat_template"})
            source = meta.get("tokenizer.chat_template")
            if not isinstance(source, str):
                raise SystemExit(f"{p} has no tokenizer.chat_template metadata")
            return cls(source)
        if p.suffix == ".json":
            config = json.loads(p.read_text(encoding="utf-8"))
            source = config.get("chat_template")
            if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
                source = next(t["template"] for t in source if t.get("name") == "default")
            if not isinstance(source, str):
                raise SystemExit(f"{p} has no chat_template")
            return cls(source, eos_token=_token_text(config.get("eos_token")))
        return cls(p.read_text(encoding="utf-8"))


class _TemplateRefused(Exception):
    """A template's own raise_exception(): the conversation is not allowed."""


def _raise(message: str) -> None:
    raise _TemplateRefused(message)


def _token_text(token: Any) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


# GGUF metadata value types (ggml/docs/gguf.md).
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """Read the key/value metadata of a GGUF file (v2 or v3) without loading it.

    Values of keys not in `keys` are skipped without being decoded, so large
    arrays such as the vocabulary cost a seek, not a parse.
    """
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        _tensors, count = struct.unpack("<QQ", f.read(16))
        out: dict[str, Any] = {}
        for _ in range(count):
            key = _read_str(f)
            (kind,) = struct.unpack("<I", f.read(4))
            wanted = keys is None or key in keys
            value = _read_value(f, kind, decode=wanted)
            if wanted:
                out[key] = value
        return out


def _read_str(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int, decode: bool) -> Any:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        raw = f.read(struct.calcsize(fmt))
        return struct.unpack(fmt, raw)[0] if decode else None
    if kind == _STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        if not decode:
            f.seek(n, 1)
            return None
        return f.read(n).decode("utf-8", errors="replace")
    if kind == _ARRAY:
        item_kind, n = struct.unpack("<IQ", f.read(12))
        if not decode and item_kind in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[item_kind]), 1)
            return None
        return [_read_value(f, item_kind, decode) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {kind}")
