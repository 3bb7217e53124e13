"""Who is calling, and how urgently: resolved once per request from its
metadata (gRPC metadata, or the HTTP headers of the same names) into a
`Caller` that the core and the faces read.

With tenants (a tenants file or API keys) the `authorization: Bearer <key>`
metadata names the tenant; without, every request is the anonymous tenant
(no limits, standard priority). The band comes from `x-llmmesh-priority`,
else OpenAI's `service_tier`, else the tenant's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.errors import MeshError, Reason
from services.tenancy.gate import Admission, resolve_priority
from services.tenancy.priority import HEADER, Priority
from services.tenancy.tenants import ANONYMOUS, Tenant, Tenants

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(eq=False)
class Caller:
    tenant: Tenant
    priority: Priority
    # Set by the core once the request holds its reservation and slot: the
    # OpenAI face reads its rate-limit headers before the first byte.
    admission: Admission | None = None

    def require_admin(self) -> None:
        """Raise ADMIN_ONLY (PERMISSION_DENIED) unless the tenant is an admin."""
        if not self.tenant.admin:
            raise MeshError(
                Reason.ADMIN_ONLY, "only an admin API key may read this",
                metadata={"tenant": self.tenant.name},
            )


class Callers:
    def __init__(self, tenants: Callable[[], Tenants | None]) -> None:
        """`tenants` returns the tenants in force (TenantBook.current, or a fixed
        set), or None when the mesh has no keys."""
        self._tenants = tenants

    def resolve(self, metadata: Metadata | None, service_tier: str | None = None) -> Caller:
        """The caller of a request: UNAUTHENTICATED for a missing or unknown key,
        INVALID_ARGUMENT (naming the field) for a priority it may not ask for."""
        tenants = self._tenants()
        tenant = ANONYMOUS if tenants is None else tenants.authenticate(metadata)
        header = next(
            (v for k, v in metadata or () if k.lower() == HEADER and isinstance(v, str)), None
        )
        return Caller(tenant, resolve_priority(tenant, header, service_tier))
