"""WebSocket subscriptions: every chunk after ``after``, in order, then ``done``; no gap, no duplicate.

Each subscription keeps the last sequence id sent to its connection and a short sending lock. A
sender (the subscribe handler with the backlog, the fanout with live chunks) takes the lock with a
conditional write, sends everything in the log after the cursor, advances it, releases the lock and
looks once more: so one sender at a time sends, in order, and a chunk that arrived while another
held the lock is sent by that holder's second look or, at worst, with the next event (the next chunk
or the job's end).

A connection authenticated once, with an API key that may since have been revoked: the fanout passes
a ``ConnectionAccess`` (``spool_core.auth.ConnectionGuard``) to ``deliver``, and a connection it no
longer allows is closed and its subscription dropped instead of being sent anything more.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from spool_core.jobs.model import TERMINAL, Job
from spool_core.jobs.ports import ChunkLog, JobStore


@dataclass
class Subscription:
    job_id: str
    connection_id: str
    last_sent: int
    done_sent: bool = False


class SubscriptionStore(Protocol):
    def put(self, subscription: Subscription) -> None: ...

    def for_job(self, job_id: str) -> list[Subscription]: ...

    def get(self, job_id: str, connection_id: str) -> Subscription | None: ...

    def lock(
        self, job_id: str, connection_id: str, owner: str, now: float, until: float
    ) -> Subscription | None:
        """Take the sending lock if it is free (or expired); returns the subscription, or None."""

    def unlock(self, job_id: str, connection_id: str, owner: str) -> None: ...

    def advance(self, job_id: str, connection_id: str, owner: str, new: int) -> None:
        """Move the cursor (only while holding the lock)."""

    def mark_done(self, job_id: str, connection_id: str) -> bool: ...

    def delete(self, job_id: str, connection_id: str) -> None: ...


class Pusher(Protocol):
    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        """Post a message to a connection; False when the connection is gone."""


class ConnectionAccess(Protocol):
    def allowed(self, connection_id: str) -> bool:
        """Whether the connection may still receive (its API key is still active)."""

    def close(self, connection_id: str) -> None:
        """Tell the connection why, then close it."""


class Fanout:
    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        subscriptions: SubscriptionStore,
        pusher: Pusher,
        *,
        clock: Callable[[], float] = time.time,
        lock_seconds: float = 15.0,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._subscriptions = subscriptions
        self._pusher = pusher
        self._clock = clock
        self._lock_seconds = lock_seconds
        self._owner = uuid.uuid4().hex

    def subscribe(self, job_id: str, connection_id: str, after: int) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        self._subscriptions.put(Subscription(job_id, connection_id, after))
        self.deliver(job_id, only=connection_id)
        return job

    def deliver(
        self, job_id: str, *, only: str | None = None, access: ConnectionAccess | None = None
    ) -> None:
        """Send each subscriber of the job what it has not had yet, then ``done`` if the job ended.

        With ``access``, a subscriber whose connection is no longer allowed is closed and its
        subscription deleted instead (``subscribe``'s caller checked its connection already)."""
        subscriptions = [s for s in self._subscriptions.for_job(job_id) if only in (None, s.connection_id)]
        for subscription in subscriptions:
            if access is not None and not access.allowed(subscription.connection_id):
                access.close(subscription.connection_id)
                self._subscriptions.delete(job_id, subscription.connection_id)
                continue
            for _ in range(2):  # the second look catches what arrived while the lock was held
                if not self._send_pending(job_id, subscription.connection_id):
                    break

    def _send_pending(self, job_id: str, connection: str) -> bool:
        """Under the subscription's lock, send the chunks after its cursor (and ``done`` after the last
        one when the job has ended). Returns False when there is nothing more to do here."""
        now = self._clock()
        subscription = self._subscriptions.lock(
            job_id, connection, self._owner, now, now + self._lock_seconds
        )
        if subscription is None:
            return False  # another sender holds it; it looks again after releasing
        try:
            job = self._jobs.get(job_id)  # status first: a terminal job's chunks are all written before it
            cursor = subscription.last_sent
            while chunks := self._chunks.after(job_id, cursor, 100):
                for chunk in chunks:
                    message = {
                        "type": "chunk",
                        "job_id": job_id,
                        "sequence_id": chunk.sequence_id,
                        "text": chunk.text,
                    }
                    if not self._pusher.send(connection, message):
                        self._subscriptions.delete(job_id, connection)
                        return False
                cursor = chunks[-1].sequence_id
                self._subscriptions.advance(job_id, connection, self._owner, cursor)
            if (
                job is not None
                and job.status in TERMINAL
                and self._subscriptions.mark_done(job_id, connection)
            ):
                self._pusher.send(
                    connection,
                    {"type": "done", "job_id": job_id, "status": job.status, "usage": job.usage.model_dump()},
                )
                self._subscriptions.delete(job_id, connection)
                return False
        finally:
            self._subscriptions.unlock(job_id, connection, self._owner)
        return True
