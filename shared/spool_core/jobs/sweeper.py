"""The sweeper: no job is forgotten. A job whose admission committed but whose message was never
sent (the function died in between), or whose message was lost, would otherwise stay queued or
running forever, holding its tenant's concurrency slot. Every job not yet ended is in an index of
pending jobs with the time of its last activity (admission, lease, renewal, hand-over, a receive of
its dead letter); the sweeper re-sends the message of each one idle for longer than any healthy job
can be.

Not while messages wait in the queue: a job queued behind a backlog (the workers busy at their
concurrency limit) still has its message, and re-sending it would only lengthen the backlog (20 jobs
behind 2 busy workers got 98 messages for 28 jobs). A lost message is re-sent once the queue has
drained. Delayed messages are no backlog: a job waiting on open circuits holds one for up to its
wait, and counting it kept every lost message of other jobs waiting as long. Such a job is not taken
for a forgotten one either: its delay is never longer than the lease, and its hand-over is activity."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from spool_core.jobs.ports import JobStore, PendingJobs, SweptQueue
from spool_core.observability import logger
from spool_core.tenancy import InvalidTenantId


@dataclass(frozen=True)
class SweepSettings:
    queued_grace_ms: int = 120_000  # a queued job is picked up within seconds when its message exists
    running_grace_ms: int = 780_000  # the lease and the message's visibility timeout, and a minute
    batch: int = 100


class Sweeper:
    def __init__(
        self,
        pending: PendingJobs,
        job_store: Callable[[str], JobStore],
        queue: SweptQueue,
        settings: SweepSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pending = pending
        self._job_store = job_store
        self._queue = queue
        self.settings = settings or SweepSettings()
        self._clock = clock

    def sweep(self) -> list[str]:
        """Re-queue every forgotten job; returns their ids."""
        now = int(self._clock() * 1000)
        oldest = now - min(self.settings.queued_grace_ms, self.settings.running_grace_ms)
        requeued: list[str] = []
        backlog = self._queue.waiting()
        if backlog:
            logger.info("messages wait in the queue; nothing is re-sent", extra={"waiting": backlog})
            return requeued
        for pending in self._pending.older_than(oldest, self.settings.batch):
            try:
                store = self._job_store(pending.tenant_id)
            except InvalidTenantId:
                logger.error(
                    "pending job with an invalid tenant id skipped", extra={"job_id": pending.job_id}
                )
                continue
            job = store.get(pending.job_id)
            if job is None or job.terminal or job.lease_live(now):
                continue
            grace = self.settings.queued_grace_ms if job.attempts == 0 else self.settings.running_grace_ms
            if now - pending.pending_since_ms < grace:
                continue
            if store.requeue(pending.job_id, pending.pending_since_ms, now):
                self._queue.send(pending.job_id, pending.tenant_id)
                requeued.append(pending.job_id)
                logger.warning(
                    "forgotten job queued again",
                    extra={"job_id": pending.job_id, "idle_ms": now - pending.pending_since_ms},
                )
        return requeued
