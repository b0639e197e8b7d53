"""What the jobs logic needs from storage and the queue, bound to one tenant's scope."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from spool_core.jobs.model import Chunk, Job


class Conflict(Exception):
    """A conditional write found the item in another state."""

    def __init__(self, current: Mapping[str, Any] | None = None) -> None:
        super().__init__("conditional write lost")
        self.current = current


class JobStore(Protocol):
    def get(self, job_id: str) -> Job | None: ...

    def claim(self, idempotency_key: str, job_id: str, fingerprint: str, created_at: str, ttl: int) -> None:
        """Write the idempotency record if the key is free; ``Conflict`` (with the record) if not."""

    def create(self, job: Job) -> None:
        """Write the job item (its id must be new)."""

    def idempotency_record(self, idempotency_key: str) -> Mapping[str, Any] | None: ...

    def discard(self, job_id: str, idempotency_key: str) -> None:
        """Undo ``claim`` and ``create`` (the job was refused or not queued): a retry starts afresh."""

    def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        condition: str | None = None,
        values: Mapping[str, Any] | None = None,
        also: Sequence[Mapping[str, Any]] = (),
    ) -> Job:
        """Set fields; ``Conflict`` if ``condition`` (over the job's fields) is false. ``also`` are
        writes to commit in the same transaction (the settlement of the job's reservation)."""

    def cancel_requested(self, job_id: str) -> bool: ...


class ChunkLog(Protocol):
    def append(self, job_id: str, chunk: Chunk) -> None:
        """Write a chunk that must not exist yet; ``Conflict`` if its sequence id is taken."""

    def after(self, job_id: str, after: int, limit: int) -> list[Chunk]: ...

    def last(self, job_id: str) -> Chunk | None: ...

    def all(self, job_id: str) -> Iterator[Chunk]: ...


class JobQueue(Protocol):
    def send(self, job_id: str, tenant_id: str) -> None: ...
