"""What the context service needs from storage. One tenant's view each: the adapters are built
for the caller's tenant, so no method takes a tenant and none can reach another's data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from spool_core.contexts.model import BlobInfo, ContextRecord, Manifest


class ConcurrentUpdate(Exception):
    """Raised by ``ContextTable.replace`` when the stored version moved on."""


class ContextExists(Exception):
    """Raised by ``ContextTable.create`` when a context with that id is already stored."""


class BlobStore(Protocol):
    def put(self, sha256: str, data: bytes) -> None: ...

    def get(self, sha256: str) -> bytes: ...

    def refresh(self, sha256: str) -> None:
        """Rewrite the blob in place so the bucket's lifecycle clock starts again."""


class BlobIndex(Protocol):
    def get_many(self, shas: Iterable[str]) -> dict[str, BlobInfo]: ...

    def put(self, info: BlobInfo, ttl: int) -> None:
        """Store what is known of a blob; the entry expires (``ttl``, epoch seconds) with the blob."""

    def put_many(self, entries: Iterable[tuple[BlobInfo, int]]) -> None: ...

    def forget(self, sha256: str) -> None:
        """Drop what is known of a blob found missing, so that the next upload of it stores it again."""


def manifest_name(version: int, body: bytes) -> str:
    """``v<version>-<digest>.json``: two writers racing for one version (concurrent PATCHes, or two
    creates from one upload) never overwrite each other's manifest; the record that wins its
    conditional write names its own."""
    return f"v{version}-{hashlib.sha256(body).hexdigest()[:16]}.json"


class ManifestStore(Protocol):
    def put(self, manifest: Manifest) -> str: ...

    def get(self, key: str) -> Manifest: ...

    def find(self, key: str) -> Manifest | None:
        """The manifest at ``key``; None when there is none (its context was deleted)."""

    def delete_all(self, context_id: str) -> None: ...


class ListedContext(NamedTuple):
    """A context as a listing has it: its record and its list position (creation time, then id)."""

    position: str
    record: ContextRecord


class ContextTable(Protocol):
    def get(self, context_id: str) -> ContextRecord | None: ...

    def list_for_tenant(self, limit: int, before: str | None) -> list[ListedContext]:
        """The tenant's contexts newest first, at most ``limit``, positioned strictly before ``before``
        (from the newest when None). Contexts stored before listing existed are not listed."""

    def create(self, record: ContextRecord, ttl: int) -> None: ...

    def replace(self, record: ContextRecord, ttl: int, expected_version: int) -> None:
        """Write ``record`` only if the stored version is still ``expected_version``."""

    def delete(self, context_id: str) -> bool: ...

    def take_upload_slot(self, hour: int, limit: int, ttl: int) -> bool:
        """Count one upload in the tenant's ``hour`` (epoch hours) unless ``limit`` are counted there
        already; one atomic conditional write. The counter expires at ``ttl`` (epoch seconds)."""

    def record_upload_used(self, upload_id: str, context_id: str, ttl: int) -> None:
        """Note that ``upload_id`` made ``context_id`` (kept until ``ttl``, epoch seconds)."""

    def upload_used_for(self, upload_id: str) -> str | None:
        """The context ``upload_id`` made, if it made one (None once the note expired)."""


class UploadChanged(Exception):
    """Raised by ``UploadStore.read`` when the object is no longer the one that was checked."""


class UploadHead(NamedTuple):
    size_bytes: int
    etag: str


class UploadStore(Protocol):
    def presign_put(self, upload_id: str, expires_in: int) -> str: ...

    def presign_post(self, upload_id: str, expires_in: int, max_bytes: int) -> dict[str, Any]:
        """A form upload (``url`` and ``fields``) that the store refuses above ``max_bytes``."""

    def head(self, upload_id: str) -> UploadHead | None: ...

    def read(self, upload_id: str, etag: str) -> bytes:
        """Exactly the object ``head`` described; ``UploadChanged`` if it was replaced since."""

    def delete(self, upload_id: str) -> None: ...
