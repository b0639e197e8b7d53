"""Tenant scoping: the mechanism that makes cross-tenant reads impossible by construction.

Every tenant-owned item is stored under a key that begins with its tenant's id, and the only way
the stores build keys is through a ``TenantScope``. A store is handed the scope of the caller's
tenant (from the authorizer), so a lookup for another tenant's id builds a key that does not exist
and answers "not found" exactly as an unknown id does. There is no unscoped read API for tenant data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SEPARATOR = "#"


class InvalidTenantId(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str

    def __post_init__(self) -> None:
        if not _TENANT_ID.match(self.id):
            raise InvalidTenantId(
                f"tenant id {self.id!r} must be 1-64 characters of letters, digits, '_', '.', '-',"
                " starting with a letter or digit"
            )


@dataclass(frozen=True, slots=True)
class TenantScope:
    """Builds the storage keys of one tenant's items."""

    tenant: Tenant

    def key(self, kind: str, ident: str) -> str:
        """Partition key of one item: ``<tenant>#<kind>#<id>``."""
        if SEPARATOR in kind:
            raise ValueError(f"kind {kind!r} must not contain {SEPARATOR!r}")
        return f"{self.tenant.id}{SEPARATOR}{kind}{SEPARATOR}{ident}"

    def object_key(self, *parts: str, root: str = "t") -> str:
        """S3 key under the tenant's prefix: ``<root>/<tenant>/<part>/<part>...`` (root ``t`` by default;
        short-lived objects use another root so the bucket can expire them by prefix)."""
        if any(not p or "/" in p or p in {".", ".."} for p in parts):
            raise ValueError(f"invalid object key parts {parts!r}")
        return "/".join((root, self.tenant.id, *parts))

    @staticmethod
    def parts_of_key(key: str) -> tuple[str, str, str]:
        """A partition key's tenant id, kind and id (for system readers of indexes across tenants; the
        tenant id is not validated)."""
        tenant_id, _, rest = key.partition(SEPARATOR)
        kind, _, ident = rest.partition(SEPARATOR)
        return tenant_id, kind, ident

    @staticmethod
    def tenant_of_key(key: str) -> Tenant:
        """The tenant a partition key belongs to (for system readers such as stream consumers)."""
        return Tenant(key.split(SEPARATOR, 1)[0])
