"""WebSocket subscriptions: every chunk after ``after``, in order, then ``done``; no gap, no duplicate.

Each subscription keeps the last sequence id sent to its connection. Whoever sends (the subscribe
handler with the backlog, the fanout with live chunks) first advances that cursor with a conditional
write and only then sends the range it claimed, so two senders never send the same chunk; any sender
reads the log after the cursor, so a chunk the stream delivered out of order or too early is still
sent, in order, by the next one.
"""

from __future__ import annotations

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

    def advance(self, job_id: str, connection_id: str, old: int, new: int) -> bool: ...

    def mark_done(self, job_id: str, connection_id: str) -> bool: ...

    def delete(self, job_id: str, connection_id: str) -> None: ...


class Pusher(Protocol):
    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        """Post a message to a connection; False when the connection is gone."""


class Fanout:
    def __init__(
        self, jobs: JobStore, chunks: ChunkLog, subscriptions: SubscriptionStore, pusher: Pusher
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._subscriptions = subscriptions
        self._pusher = pusher

    def subscribe(self, job_id: str, connection_id: str, after: int) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        self._subscriptions.put(Subscription(job_id, connection_id, after))
        self.deliver(job_id, only=connection_id)
        return job

    def deliver(self, job_id: str, *, only: str | None = None) -> None:
        """Send each subscriber of the job what it has not had yet, then ``done`` if the job ended."""
        subscriptions = [s for s in self._subscriptions.for_job(job_id) if only in (None, s.connection_id)]
        if not subscriptions:
            return  # one query per job without subscribers, nothing more
        job = self._jobs.get(job_id)  # status first: a terminal job's chunks are all written before it
        for subscription in subscriptions:
            self._catch_up(subscription, job)

    def _catch_up(self, subscription: Subscription, job: Job | None) -> None:
        job_id, connection = subscription.job_id, subscription.connection_id
        cursor = subscription.last_sent
        while True:
            chunks = self._chunks.after(job_id, cursor, 100)
            if not chunks:
                break
            claimed = chunks[-1].sequence_id
            if not self._subscriptions.advance(job_id, connection, cursor, claimed):
                current = self._subscriptions.get(job_id, connection)
                if current is None:
                    return
                cursor = current.last_sent  # another sender took that range
                continue
            for chunk in chunks:
                message = {
                    "type": "chunk",
                    "job_id": job_id,
                    "sequence_id": chunk.sequence_id,
                    "text": chunk.text,
                }
                if not self._pusher.send(connection, message):
                    self._subscriptions.delete(job_id, connection)
                    return
            cursor = claimed
        if job is not None and job.status in TERMINAL and self._subscriptions.mark_done(job_id, connection):
            self._pusher.send(
                connection,
                {"type": "done", "job_id": job_id, "status": job.status, "usage": job.usage.model_dump()},
            )
            self._subscriptions.delete(job_id, connection)
