"""API keys: generated once, shown once, stored only as a hash, resolved to a tenant.

Operators list, revoke and rotate them (``spool keys``); a revoked key keeps its record (status and
``revoked_at``) for audit. Every request resolves its key here, through a short per-environment cache
(``KeyCache``), so a revocation takes effect within that cache's lifetime, not at once. WebSocket
connections outlive a single request: ``ConnectionGuard`` ties each one to the key it opened with, so
revoking the key closes them too.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from spool_core.clock import rfc3339, utc_now
from spool_core.errors import ConfigurationError, Conflict, NotFound, SpoolError, Unauthorized
from spool_core.ids import new_id
from spool_core.tenancy import Tenant

KEY_PREFIX = "sk-"
USAGE_KEY_PREFIX = "spool-usage-"
CACHE_SECONDS_ENV = "SPOOL_AUTH_CACHE_SECONDS"
DEFAULT_CACHE_SECONDS = 30.0
NEGATIVE_CACHE_SECONDS = 5.0
CACHE_MAX_ENTRIES = 10_000
REVOKED_MESSAGE = "This API key was revoked or has expired"

KeyState = Literal["active", "revoked", "expired"]


def hash_api_key(key: str) -> str:
    """SHA-256 of the key. Keys carry 256 random bits, so a fast hash is enough (no salt or KDF needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def usage_key(tenant_id: str) -> str:
    """The value of the tenant's API Gateway API key, which its usage plan meters and throttles.

    The REST API takes API keys from the authorizer (``ApiKeySourceType: AUTHORIZER``): the authorizer
    returns this as ``usageIdentifierKey`` and ``spool keys create`` registers it in the stack's usage
    plan. Both derive it from the tenant id alone, so neither looks the other up, and every key of a
    tenant (and its events tokens) counts against one quota. It is not a credential: clients never
    send it, API Gateway only uses it to name whose usage a request is.
    """
    return USAGE_KEY_PREFIX + hashlib.sha256(tenant_id.encode()).hexdigest()[:40]


def extract_api_key(headers: Mapping[str, str] | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (header names in any case)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    authorization = lowered.get("authorization", "").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key = lowered.get("x-api-key", "").strip()
    return api_key or None


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


class ApiKeyRecord(BaseModel):
    """What the key table holds for one key. The key itself is never stored."""

    model_config = ConfigDict(frozen=True)

    key_hash: str
    key_id: str
    tenant_id: str
    created_at: str
    disabled: bool = False  # the switch of records written before keys could be revoked
    description: str = ""
    status: Literal["active", "revoked"] = "active"
    revoked_at: str | None = None
    # Set by a rotation with a grace period: the key keeps working until then, beside its successor.
    expires_at: str | None = None
    replaced_by: str | None = None

    @property
    def tenant(self) -> Tenant:
        return Tenant(self.tenant_id)

    def state(self, now: datetime) -> KeyState:
        if self.status == "revoked" or self.disabled:
            return "revoked"
        if self.expires_at is not None and _moment(self.expires_at) <= now:
            return "expired"
        return "active"

    def summary(self, now: datetime) -> dict[str, Any]:
        """What an operator is shown: never the key (it is not stored) nor its hash."""
        return {
            "key_id": self.key_id,
            "tenant": self.tenant_id,
            "description": self.description,
            "created_at": self.created_at,
            "status": self.state(now),
            "revoked_at": self.revoked_at,
            "expires_at": self.expires_at,
            "replaced_by": self.replaced_by,
        }


class ApiKeyStore(Protocol):
    def get(self, key_hash: str) -> ApiKeyRecord | None: ...

    def put(self, record: ApiKeyRecord) -> None: ...

    def by_key_id(self, key_id: str, tenant_id: str | None = None) -> ApiKeyRecord | None:
        """The key with this id; with ``tenant_id``, only that tenant's (and a cheaper lookup)."""

    def list_for_tenant(self, tenant_id: str) -> list[ApiKeyRecord]: ...

    def list_all(self) -> list[ApiKeyRecord]:
        """Every key of every tenant (an operator's listing; the only read that visits the whole table)."""

    def revoke(self, key_hash: str, revoked_at: str, replaced_by: str | None = None) -> ApiKeyRecord:
        """Mark the key revoked, keeping the record (and, for a rotation, which key replaced it). A
        second revoke keeps the first ``revoked_at``."""

    def expire(self, key_hash: str, expires_at: str, replaced_by: str) -> ApiKeyRecord:
        """Set when the key stops working and which key replaced it."""


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "List the keys with 'spool keys list' (add --tenant <tenant> for one tenant's keys)",
    )


class ApiKeyRevoked(Conflict):
    code = "api_key_revoked"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Create a new key instead: 'spool keys create --tenant <tenant>'",
    )


def revoked_key_error(job_id: str | None = None, last_sequence_id: int = 0, resume: str = "") -> Unauthorized:
    """What a client still connected with a revoked key is told before its connection closes; with
    ``job_id``, the job it was following, the last chunk it was sent, and how to ``resume`` (each
    stream says it in its own terms): the job goes on."""
    reconnect = (
        f"Job {job_id} goes on: {resume}" if job_id is not None else "Reconnect with an active API key"
    )
    return Unauthorized(
        REVOKED_MESSAGE,
        details={"job_id": job_id, "last_sequence_id": last_sequence_id} if job_id is not None else None,
        suggestions=[reconnect, "Ask the operator for a new key ('spool keys create --tenant <tenant>')"],
    )


def cache_seconds_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``SPOOL_AUTH_CACHE_SECONDS`` (default 30; 0 turns the key cache off)."""
    raw = (os.environ if environ is None else environ).get(CACHE_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise ConfigurationError(
            f"{CACHE_SECONDS_ENV} must be a number of seconds >= 0, not {raw!r}",
            details={"variable": CACHE_SECONDS_ENV, "value": raw},
            suggestions=[f"Set {CACHE_SECONDS_ENV} to 30 (the default), or 0 to turn the key cache off"],
        )
    return seconds


class KeyCache:
    """Key lookups remembered in memory per execution environment, keyed by the key's hash.

    Every API request runs the authorizer (API Gateway's own result cache is off: keys arrive in
    either of two headers, so there is no single identity source to cache on), and the fanout checks
    each WebSocket connection's key before pushing to it: without this, each request and each push
    would read DynamoDB. The price: a key revoked just after an environment looked it up keeps
    working there for up to ``seconds``. Unknown keys are remembered as well (a client retrying with
    a bad key costs nothing), but only ``negative_seconds``, so a key created right after someone
    tried it works within seconds. ``seconds=0`` turns the cache off. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        seconds: float = DEFAULT_CACHE_SECONDS,
        *,
        negative_seconds: float = NEGATIVE_CACHE_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds = seconds
        self._negative_seconds = min(negative_seconds, seconds)
        self._max_entries = max_entries  # random keys sprayed at the API must not grow it without end
        self._clock = clock
        self._entries: OrderedDict[str, tuple[ApiKeyRecord | None, float]] = OrderedDict()
        self._lock = threading.Lock()  # the fanout checks keys from several threads at once

    def lookup(self, key_hash: str, load: Callable[[str], ApiKeyRecord | None]) -> ApiKeyRecord | None:
        if self._seconds <= 0:
            return load(key_hash)
        now = self._clock()
        entry = self._entries.get(key_hash)
        if entry is not None and entry[1] > now:
            return entry[0]
        record = load(key_hash)
        lifetime = self._seconds if record is not None else self._negative_seconds
        with self._lock:
            self._entries[key_hash] = (record, now + lifetime)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return record

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)


@dataclass(frozen=True)
class Rotation:
    key: str  # the new key: shown once
    new: ApiKeyRecord
    old: ApiKeyRecord


class ApiKeys:
    """Issues keys, resolves presented keys to their tenant, and lets operators list, revoke and
    rotate them. ``now`` is the wall clock that revocation and expiry times are read against."""

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        cache: KeyCache | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        # The functions' (built by bootstrap, which passes none): SPOOL_AUTH_CACHE_SECONDS.
        self._cache = cache if cache is not None else KeyCache(cache_seconds_from_env())
        self._now = now

    def authenticate(self, presented: str | None) -> ApiKeyRecord | None:
        """The record of a presented key that may be used now; None if it is missing, unknown, revoked
        or expired."""
        if not presented:
            return None
        return self.check(hash_api_key(presented))

    def check(self, key_hash: str) -> ApiKeyRecord | None:
        """As ``authenticate``, for a key known by its hash (a WebSocket connection's key)."""
        record = self._cache.lookup(key_hash, self._store.get)
        if record is None or record.state(self._now()) != "active":
            return None
        return record

    def check_id(self, key_id: str, tenant_id: str) -> ApiKeyRecord | None:
        """As ``check``, for a key known by its id within its tenant (an events token names the key it
        was handed to), through the same cache."""
        record = self._cache.lookup(
            f"id:{tenant_id}:{key_id}", lambda _: self._store.by_key_id(key_id, tenant_id)
        )
        if record is None or record.state(self._now()) != "active":
            return None
        return record

    def register(self, key: str, tenant: Tenant, description: str = "") -> ApiKeyRecord:
        """Store a key the caller chose (dev keys) or generated; returns the stored record."""
        record = ApiKeyRecord(
            key_hash=hash_api_key(key),
            key_id=new_id("key"),
            tenant_id=tenant.id,
            created_at=rfc3339(self._now()),
            description=description,
        )
        self._store.put(record)
        self._cache.forget(record.key_hash)
        return record

    def ensure(self, key: str, tenant: Tenant, description: str = "") -> ApiKeyRecord:
        """A key the caller chose (dev keys), active for ``tenant``: its record as it is when it
        already is (same id, so what names the key, such as links.events tokens, keeps working),
        else registered anew (a new id)."""
        stored = self._store.get(hash_api_key(key))
        if stored is not None and stored.tenant_id == tenant.id and stored.state(self._now()) == "active":
            return stored
        return self.register(key, tenant, description)

    def create(self, tenant: Tenant, description: str = "") -> tuple[str, ApiKeyRecord]:
        key = generate_api_key()
        return key, self.register(key, tenant, description)

    def list_keys(self, tenant: Tenant | None = None) -> list[ApiKeyRecord]:
        """A tenant's keys (every tenant's without one), oldest first."""
        records = self._store.list_for_tenant(tenant.id) if tenant else self._store.list_all()
        return sorted(records, key=lambda r: (r.tenant_id, r.created_at, r.key_id))

    def summaries(self, tenant: Tenant | None = None) -> list[dict[str, Any]]:
        """What ``spool keys list`` shows: ids, tenant, status and times, never a key or its hash."""
        now = self._now()
        return [record.summary(now) for record in self.list_keys(tenant)]

    def find(self, key_id: str, tenant: Tenant | None = None) -> ApiKeyRecord:
        """The key with this id; with ``tenant``, only if it is that tenant's (another's is not found)."""
        record = self._store.by_key_id(key_id, tenant.id if tenant else None)
        if record is None or (tenant is not None and record.tenant_id != tenant.id):
            owner = f" for tenant {tenant.id}" if tenant else ""
            raise ApiKeyNotFound(f"No API key {key_id}{owner}", details={"key_id": key_id})
        return record

    def revoke(self, key_id: str, *, tenant: Tenant | None = None) -> ApiKeyRecord:
        """Revoke at once (a key in a rotation's grace period too). Idempotent; the record stays."""
        record = self.find(key_id, tenant)
        revoked = self._store.revoke(record.key_hash, rfc3339(self._now()))
        self._cache.forget(record.key_hash)
        return revoked

    def rotate(
        self,
        key_id: str,
        *,
        grace_seconds: float = 0,
        tenant: Tenant | None = None,
        description: str | None = None,
    ) -> Rotation:
        """A new key for the key's tenant; the old one is revoked now, or (``grace_seconds`` > 0) keeps
        working until the grace period ends, so clients can switch without a failed request."""
        old = self.find(key_id, tenant)
        now = self._now()
        if old.state(now) != "active":
            raise ApiKeyRevoked(
                f"API key {key_id} is {old.state(now)}: there is nothing to rotate",
                details={"key_id": key_id, "status": old.state(now)},
                suggestions=[f"Create a new key instead: 'spool keys create --tenant {old.tenant_id}'"],
            )
        text = description if description is not None else old.description
        key, new = self.create(old.tenant, text)
        if grace_seconds > 0:
            until = now + timedelta(seconds=grace_seconds)
            if old.expires_at is not None:
                until = min(until, _moment(old.expires_at))  # a grace period never grows
            old = self._store.expire(old.key_hash, rfc3339(until), new.key_id)
        else:
            old = self._store.revoke(old.key_hash, rfc3339(now), new.key_id)
        self._cache.forget(old.key_hash)
        return Rotation(key, new, old)


@dataclass(frozen=True)
class ConnectionIdentity:
    """Who a WebSocket connection authenticated as at ``$connect``: its tenant, and the hash of its key
    (None for a connection opened before connections recorded their key)."""

    tenant_id: str
    key_hash: str | None


class ConnectionKeyStore(Protocol):
    def identity(self, connection_id: str) -> ConnectionIdentity | None:
        """The connection's tenant and key, from its own item (one read); None for an unknown connection."""


class ConnectionCloser(Protocol):
    def close(self, connection_id: str, error: SpoolError, request_id: str | None) -> None:
        """Send ``error`` (with the request that found it) as the connection's last frame, then close
        it (one already gone is fine)."""


class ConnectionGuard:
    """Keeps WebSocket connections tied to the API key they opened with.

    A connection authenticates once, at ``$connect``, and API Gateway keeps it open for up to two
    hours; without this, revoking a key would not stop what its open connections receive. The
    connection's key is recorded at ``$connect``; before pushing to a connection (the fanout) or
    serving one of its messages (``subscribe``), ``allowed`` checks that key through the same cache as
    the authorizer, and ``close`` ends a connection whose key is no longer active: a final
    ``unauthorized`` error frame, then the connection is closed. Which tenant and key a connection uses
    never change, so they are remembered here for the environment's life (bounded): a ``subscribe``
    served where its ``$connect`` was reads nothing to know its tenant.
    """

    def __init__(
        self,
        keys: ApiKeys,
        connections: ConnectionKeyStore,
        closer: ConnectionCloser,
        *,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self._keys = keys
        self._connections = connections
        self._closer = closer
        self._max_entries = max_entries
        self._known: OrderedDict[str, ConnectionIdentity | None] = OrderedDict()
        self._lock = threading.Lock()  # the fanout delivers several jobs at once

    def admit(self, connection_id: str, record: ApiKeyRecord) -> None:
        """A connection opened with ``record``'s key (which the connection's own item records, in the
        one write that stores it at ``$connect``)."""
        self._memo(connection_id, ConnectionIdentity(record.tenant_id, record.key_hash))

    def identity(self, connection_id: str) -> ConnectionIdentity | None:
        """The tenant and key the connection authenticated with; None for a connection that never did."""
        with self._lock:
            if connection_id in self._known:
                return self._known[connection_id]
        identity = self._connections.identity(connection_id)
        self._memo(connection_id, identity)
        return identity

    def allowed(self, connection_id: str, key_hash: str | None = None) -> bool:
        """Whether the connection's key is still active: ``key_hash`` when the caller knows it (a
        subscription records it), else the connection's own (remembered, or one read)."""
        if key_hash is None:
            identity = self.identity(connection_id)
            key_hash = identity.key_hash if identity is not None else None
        if key_hash is None:
            return True  # opened before connections recorded their key; API Gateway ends it within 2 h
        return self._keys.check(key_hash) is not None

    def close(
        self, connection_id: str, request_id: str | None, *, job_id: str | None = None, last_sent: int = 0
    ) -> None:
        """Tell the connection its key was revoked, naming the request (a message's or the fanout
        invocation's) whose check found it and the job it asked for or was being sent (with the last
        chunk sent of it), then close it."""
        resume = (
            "connect with an active key and send"
            f' {{"action": "subscribe", "job_id": "{job_id}", "after": <the last sequence_id you hold>}}'
        )
        self._closer.close(connection_id, revoked_key_error(job_id, last_sent, resume), request_id)

    def _memo(self, connection_id: str, identity: ConnectionIdentity | None) -> None:
        with self._lock:
            self._known[connection_id] = identity
            while len(self._known) > self._max_entries:
                self._known.popitem(last=False)
