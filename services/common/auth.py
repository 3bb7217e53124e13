"""Optional API keys at the mesh's entry (the router).

Clients send `Authorization: Bearer <key>` over HTTP (Envoy passes the header
on as gRPC metadata) or `authorization: Bearer <key>` metadata over gRPC.
Only SHA-256 digests of the keys are kept in memory, and neither keys nor
the header are ever logged. Health, reflection and metrics stay open for
probes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

from services.common.errors import MeshError, Reason

_SCHEME = "bearer "


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple({_digest(k) for k in keys if k})
        if not self._digests:
            raise ValueError("no API keys given")

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def load(cls, file: str | Path | None, env_value: str | None) -> ApiKeys | None:
        """Keys from a file (one per line, `#` comments) and/or a comma-separated
        value; None when neither is set (authentication off)."""
        keys: list[str] = []
        if file:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as exc:
                raise SystemExit(f"cannot read the API keys file {file}: {exc}") from exc
            keys += [line.strip() for line in text.splitlines()]
            keys = [k for k in keys if k and not k.startswith("#")]
            if not keys:
                raise SystemExit(f"the API keys file {file} holds no key")
        if env_value:
            keys += [k.strip() for k in env_value.split(",") if k.strip()]
        return cls(keys) if keys else None

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Raise UNAUTHENTICATED unless the metadata carries a valid key."""
        header = next(
            (v for k, v in metadata or () if k == "authorization" and isinstance(v, str)), None
        )
        if header is None:
            raise MeshError(
                Reason.UNAUTHENTICATED,
                "an API key is required: send `Authorization: Bearer <key>`",
            )
        if not header[: len(_SCHEME)].lower() == _SCHEME:
            raise MeshError(
                Reason.UNAUTHENTICATED, "the Authorization header must be `Bearer <key>`"
            )
        given = _digest(header[len(_SCHEME):].strip())
        # Compare against every digest, so the time taken says nothing about which matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise MeshError(Reason.UNAUTHENTICATED, "the API key is not valid")
