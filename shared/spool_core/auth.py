"""API keys: generated once, shown once, stored only as a hash, resolved to a tenant."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from spool_core.clock import rfc3339, utc_now
from spool_core.ids import new_id
from spool_core.tenancy import Tenant

KEY_PREFIX = "sk-"


def hash_api_key(key: str) -> str:
    """SHA-256 of the key. Keys carry 256 random bits, so a fast hash is enough (no salt or KDF needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def extract_api_key(headers: Mapping[str, str] | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (header names in any case)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    authorization = lowered.get("authorization", "").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = lowered.get("x-api-key", "").strip()
    return api_key or None


class ApiKeyRecord(BaseModel):
    """What the key table holds for one key. The key itself is never stored."""

    model_config = ConfigDict(frozen=True)

    key_hash: str
    key_id: str
    tenant_id: str
    created_at: str
    disabled: bool = False
    description: str = ""

    @property
    def tenant(self) -> Tenant:
        return Tenant(self.tenant_id)


class ApiKeyStore(Protocol):
    def get(self, key_hash: str) -> ApiKeyRecord | None: ...

    def put(self, record: ApiKeyRecord) -> None: ...


class ApiKeys:
    """Issues keys and resolves presented keys to their tenant."""

    def __init__(self, store: ApiKeyStore) -> None:
        self._store = store

    def authenticate(self, presented: str | None) -> ApiKeyRecord | None:
        if not presented:
            return None
        record = self._store.get(hash_api_key(presented))
        if record is None or record.disabled:
            return None
        return record

    def register(self, key: str, tenant: Tenant, description: str = "") -> ApiKeyRecord:
        """Store a key the caller chose (dev keys) or generated; returns the stored record."""
        record = ApiKeyRecord(
            key_hash=hash_api_key(key),
            key_id=new_id("key"),
            tenant_id=tenant.id,
            created_at=rfc3339(utc_now()),
            description=description,
        )
        self._store.put(record)
        return record

    def create(self, tenant: Tenant, description: str = "") -> tuple[str, ApiKeyRecord]:
        key = generate_api_key()
        return key, self.register(key, tenant, description)
