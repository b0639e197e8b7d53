"""In-memory implementations of the ports, for unit tests that run with the network off."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from spool.devstack.runtime import HandlerError, InvocationError
from spool_core.circuits import Circuit
from spool_core.contexts.model import BlobInfo, ContextRecord, Manifest
from spool_core.contexts.ports import (
    ConcurrentUpdate,
    ContextExists,
    ListedContext,
    UploadChanged,
    UploadHead,
    manifest_name,
)
from spool_core.jobs.model import JobSummary
from spool_core.jobs.ports import ListedJob
from spool_core.listing import position


class FakeFunction:
    """A function of the local runtime, in-process: what the handler raises comes back as the
    ``HandlerError`` a container would report."""

    def __init__(self, behaviour: Callable[[Any], Any], timeout: int = 29) -> None:
        self.behaviour = behaviour
        self.events: list[dict[str, Any]] = []
        self.spec = type("Spec", (), {"timeout": timeout})()

    def invoke(self, event: dict[str, Any], timeout: float | None = None, wait: float = 30) -> Any:
        self.events.append(event)
        try:
            return self.behaviour(event)
        except InvocationError:
            raise
        except Exception as exc:
            raise HandlerError({"errorType": type(exc).__name__, "errorMessage": str(exc)}) from exc


class MemoryBlobStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.refreshes = 0

    def put(self, sha256: str, data: bytes) -> None:
        self.puts += 1
        self.objects[sha256] = bytes(data)

    def get(self, sha256: str) -> bytes:
        return self.objects[sha256]

    def refresh(self, sha256: str) -> None:
        if sha256 not in self.objects:
            raise KeyError(sha256)
        self.refreshes += 1


class MemoryRequestStore:
    """``spool_core.jobs.ports.RequestStore`` in memory: one tenant's messages too large for a job item."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        self.objects[sha256] = bytes(data)
        return sha256

    def get(self, sha256: str) -> bytes:
        self.gets += 1
        return self.objects[sha256]


class MemoryBlobIndex:
    def __init__(self) -> None:
        self.items: dict[str, BlobInfo] = {}
        self.ttls: dict[str, int] = {}

    def get_many(self, shas: Iterable[str]) -> dict[str, BlobInfo]:
        return {sha: self.items[sha].model_copy(deep=True) for sha in shas if sha in self.items}

    def put(self, info: BlobInfo, ttl: int) -> None:
        self.items[info.sha256] = info.model_copy(deep=True)
        self.ttls[info.sha256] = ttl

    def put_many(self, entries: Iterable[tuple[BlobInfo, int]]) -> None:
        for info, ttl in entries:
            self.put(info, ttl)

    def forget(self, sha256: str) -> None:
        self.items.pop(sha256, None)
        self.ttls.pop(sha256, None)


class MemoryManifestStore:
    def __init__(self) -> None:
        self.objects: dict[str, str] = {}

    def put(self, manifest: Manifest) -> str:
        body = manifest.model_dump_json()
        key = f"contexts/{manifest.context_id}/{manifest_name(manifest.version, body.encode())}"
        self.objects[key] = body
        return key

    def get(self, key: str) -> Manifest:
        return Manifest.model_validate_json(self.objects[key])

    def find(self, key: str) -> Manifest | None:
        return self.get(key) if key in self.objects else None

    def delete_all(self, context_id: str) -> None:
        for key in [k for k in self.objects if k.startswith(f"contexts/{context_id}/")]:
            del self.objects[key]


class MemoryContextTable:
    def __init__(self) -> None:
        self.items: dict[str, tuple[ContextRecord, int]] = {}
        self.upload_counts: dict[int, int] = {}
        self.used_uploads: dict[str, str] = {}
        self.before_replace: list[str] = []  # context ids to bump concurrently, once
        self.lock = threading.Lock()  # each conditional write one atomic step, as DynamoDB's

    def get(self, context_id: str) -> ContextRecord | None:
        found = self.items.get(context_id)
        return found[0] if found else None

    def list_for_tenant(self, limit: int, before: str | None) -> list[ListedContext]:
        """The list index: every record by position, newest first, strictly before ``before``."""
        listed = sorted(
            (
                ListedContext(position(record.created_at, record.context_id), record)
                for record, _ in self.items.values()
            ),
            key=lambda entry: entry.position,
            reverse=True,
        )
        return [entry for entry in listed if before is None or entry.position < before][:limit]

    def record_upload_used(self, upload_id: str, context_id: str, ttl: int) -> None:
        self.used_uploads[upload_id] = context_id

    def upload_used_for(self, upload_id: str) -> str | None:
        return self.used_uploads.get(upload_id)

    def take_upload_slot(self, hour: int, limit: int, ttl: int) -> bool:
        counted = self.upload_counts.get(hour, 0)
        if counted >= limit:
            return False
        self.upload_counts[hour] = counted + 1
        return True

    def create(self, record: ContextRecord, ttl: int) -> None:
        with self.lock:
            if record.context_id in self.items:
                raise ContextExists(record.context_id)
            self.items[record.context_id] = (record, ttl)

    def replace(self, record: ContextRecord, ttl: int, expected_version: int) -> None:
        if record.context_id in self.before_replace:
            self.before_replace.remove(record.context_id)
            current, old_ttl = self.items[record.context_id]
            self.items[record.context_id] = (
                current.model_copy(update={"version": current.version + 1}),
                old_ttl,
            )
        with self.lock:
            current_record = self.get(record.context_id)
            if current_record is None or current_record.version != expected_version:
                raise ConcurrentUpdate(record.context_id)
            self.items[record.context_id] = (record, ttl)

    def delete(self, context_id: str) -> bool:
        with self.lock:
            return self.items.pop(context_id, None) is not None


class MemoryUploadStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.replace_before_read: dict[str, bytes] = {}  # another PUT lands between head and read

    def presign_put(self, upload_id: str, expires_in: int) -> str:
        return f"https://uploads.example/{upload_id}?expires={expires_in}"

    def presign_post(self, upload_id: str, expires_in: int, max_bytes: int) -> dict[str, Any]:
        return {"url": "https://uploads.example/", "fields": {"key": upload_id, "max": str(max_bytes)}}

    def head(self, upload_id: str) -> UploadHead | None:
        data = self.objects.get(upload_id)
        return None if data is None else UploadHead(len(data), hashlib.md5(data).hexdigest())  # noqa: S324

    def read(self, upload_id: str, etag: str) -> bytes:
        if upload_id in self.replace_before_read:
            self.objects[upload_id] = self.replace_before_read.pop(upload_id)
        data = self.objects.get(upload_id)
        if data is None or hashlib.md5(data).hexdigest() != etag:  # noqa: S324 - S3's ETag
            raise UploadChanged(upload_id)
        return data

    def delete(self, upload_id: str) -> None:
        self.objects.pop(upload_id, None)


class MemoryCircuitStore:
    """Circuit items with an optimistic version, as the system table keeps them."""

    def __init__(self) -> None:
        self.items: dict[str, Circuit] = {}
        self.lock = threading.Lock()

    def get_many(self, model_ids: Iterable[str]) -> dict[str, Circuit]:
        with self.lock:
            return {m: dataclasses.replace(self.items[m]) for m in model_ids if m in self.items}

    def save(self, circuit: Circuit, expected_version: int) -> bool:
        with self.lock:
            current = self.items.get(circuit.model_id)
            if (current.version if current else 0) != expected_version:
                return False
            self.items[circuit.model_id] = dataclasses.replace(circuit)
            return True


from spool_core.auth import ApiKeyRecord  # noqa: E402


class MemoryApiKeyStore:
    """The API key table in memory: items by key hash, plus the lookups its tenant index serves (a
    tenant's keys, a tenant's key by id). ``gets`` counts reads by hash, to see what a cache saves."""

    def __init__(self) -> None:
        self.items: dict[str, ApiKeyRecord] = {}
        self.gets = 0

    def get(self, key_hash: str) -> ApiKeyRecord | None:
        self.gets += 1
        return self.items.get(key_hash)

    def put(self, record: ApiKeyRecord) -> None:
        self.items[record.key_hash] = record

    def by_key_id(self, key_id: str, tenant_id: str | None = None) -> ApiKeyRecord | None:
        return next(
            (r for r in self.items.values() if r.key_id == key_id and tenant_id in (None, r.tenant_id)),
            None,
        )

    def list_for_tenant(self, tenant_id: str) -> list[ApiKeyRecord]:
        return [r for r in self.items.values() if r.tenant_id == tenant_id]

    def list_all(self) -> list[ApiKeyRecord]:
        return list(self.items.values())

    def revoke(self, key_hash: str, revoked_at: str, replaced_by: str | None = None) -> ApiKeyRecord:
        record = self.items[key_hash]
        update = {"status": "revoked", "revoked_at": record.revoked_at or revoked_at}
        if replaced_by is not None:
            update["replaced_by"] = replaced_by
        self.items[key_hash] = record.model_copy(update=update)
        return self.items[key_hash]

    def expire(self, key_hash: str, expires_at: str, replaced_by: str) -> ApiKeyRecord:
        record = self.items[key_hash]
        self.items[key_hash] = record.model_copy(
            update={"expires_at": expires_at, "replaced_by": replaced_by}
        )
        return self.items[key_hash]


class KeyClock:
    """Monotonic seconds for the key cache and wall time for revocation and expiry, moved together."""

    def __init__(self) -> None:
        self.seconds = 1_000.0
        self.wall = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        self.wall += timedelta(seconds=seconds)


class ListingJobStore:
    """One tenant's ``JobStore`` of a ``tests.ledger.MemoryLedger`` with the list indexes: every job
    of the tenant (or those of one status) by position, newest first. Everything else is the ledger's."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def list_for_tenant(self, status: str | None, limit: int, before: str | None) -> list[ListedJob]:
        ledger, tenant = self._store.ledger, self._store.tenant_id
        with ledger.lock:
            items = [item for (owner, _), item in ledger.jobs.items() if owner == tenant]
        listed = sorted(
            (
                ListedJob(position(item["created_at"], item["job_id"]), JobSummary.model_validate(item))
                for item in items
                if status is None or item["status"] == status
            ),
            key=lambda entry: entry.position,
            reverse=True,
        )
        return [entry for entry in listed if before is None or entry.position < before][:limit]


class MemoryRetryKeys:
    """Keys by request digest with their expiry, as the jobs table keeps them (TTL read on get; a
    second key while one is remembered makes the digest ambiguous)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str | None, int]] = {}  # digest -> (key, None: ambiguous; expiry)

    def remember(self, digest: str, key: str, now_s: int, expires_at_s: int) -> None:
        known = self.items.get(digest)
        self.items[digest] = (key if known is None or known[1] <= now_s else None, expires_at_s)

    def recall(self, digest: str, now_s: int) -> str | None:
        key, expires = self.items.get(digest, (None, 0))
        return key if expires > now_s else None
