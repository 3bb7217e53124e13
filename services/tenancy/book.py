"""The tenants in force, swapped whole when their file changes.

`TenantBook.current` is one immutable `Tenants`; a reload builds a new one
and swaps the reference, so a request that looked its tenant up keeps that
`Tenant` (and its reservations settle against it) while new requests see the
new file. A file with an error keeps the tenants in force and logs the file
and line. Reloads happen when the file's modification time, size or inode
changes (polled) and on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from services.tenancy.tenants import Tenants, TenantsFileError, load_tenants

log = logging.getLogger("llmmesh.tenancy")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TenantBook:
    def __init__(
        self, path: str | Path, canonical_model: Callable[[str], str | None] | None = None
    ) -> None:
        """Load the file; TenantsFileError (file and line) when it cannot be used,
        which at start should end the process."""
        self.path = Path(path)
        self._canonical_model = canonical_model
        self._stamp = _stamp(self.path)
        self.current: Tenants = load_tenants(self.path, canonical_model)
        self.reloads = 0
        self.failed_reloads = 0

    def reload(self) -> bool:
        """Read the file again; True when the new tenants are in force."""
        self._stamp = _stamp(self.path)
        try:
            tenants = load_tenants(self.path, self._canonical_model)
        except TenantsFileError as exc:
            self.failed_reloads += 1
            log.error(
                "tenants file not reloaded, the tenants in force stay",
                extra={"file": exc.path, "line": exc.line, "error": str(exc)},
            )
            return False
        self.current = tenants
        self.reloads += 1
        log.info("tenants reloaded", extra={"file": str(self.path), "tenants": len(tenants)})
        return True

    def changed(self) -> bool:
        return _stamp(self.path) != self._stamp

    async def watch(self, interval: float = 2.0) -> None:
        """Reload whenever the file changes, forever (run it as a task)."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()

    def reload_on_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reload on SIGHUP (on the event loop, between requests)."""
        loop = loop or asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
