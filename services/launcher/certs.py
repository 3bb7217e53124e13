"""Development certificates for `make up TLS=1`: made once by scripts/dev_ca.sh
and used again while they are valid for at least another day."""

from __future__ import annotations

import subprocess
from pathlib import Path

from services.launcher.plan import LaunchError, MeshTls

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("envoy", "router", "adapter", "client")


def _valid(cert: Path) -> bool:
    if not cert.is_file():
        return False
    check = subprocess.run(
        ["openssl", "x509", "-checkend", "86400", "-noout", "-in", str(cert)],
        capture_output=True, check=False,
    )
    return check.returncode == 0


def ensure(tls: MeshTls) -> bool:
    """Certificates in tls.dir, made when missing or about to expire.
    True when they were made now."""
    wanted = [tls.ca] + [p for n in NAMES for p in (tls.cert(n), tls.key(n))]
    if all(p.is_file() for p in wanted) and all(
        _valid(p) for p in (tls.ca, *(tls.cert(n) for n in NAMES))
    ):
        return False
    try:
        made = subprocess.run(
            ["bash", str(ROOT / "scripts" / "dev_ca.sh"), str(tls.dir)],
            capture_output=True, text=True, check=False, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot make development certificates: {exc}") from exc
    if made.returncode != 0:
        raise LaunchError(
            "scripts/dev_ca.sh failed (is openssl installed?):\n" + made.stderr.strip()
        )
    return True
