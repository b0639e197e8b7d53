"""The dead-letter path: a job whose message could not be processed ends ``failed`` with a structured
error, its reservation settled, whatever input the message carries. It never loops and never leaves a
job running.

When the settled end fails (a throttled call after botocore's retries, a reply lost, a log read
refused), the dead letter comes back after its visibility timeout (30 s) and the settled end is
tried again, until ``SETTLE_WINDOW_MS`` after the job's first dead letter: from then on a settled
end that fails is followed by a bare one, which releases the concurrency slot alone, with the reason
logged. The window is kept on the job item (when its dead letters were first received since its
last lease), not counted from SQS's ``ApproximateReceiveCount``, which SQS does not reset when it
moves a message to the dead-letter queue; a job with two dead letters has one window, and a lease
taken since (a message sent again) starts a new one. A call that hangs is not a failure that
answers: it outlasts the function's timeout (botocore waits 10 s four times), the invocation is
ended, and the settled end is tried first at every receive, so a slow store never ends a job bare.

Each receive also touches the job's pending time, so the sweeper, which sends a running job idle
for twice its lease and a minute back to the workers, leaves a dead-lettered one to its dead letter
(which arrives about a lease after the last attempt) while its receives last."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from spool_core.clock import from_epoch, rfc3339
from spool_core.jobs.ending import end_from_log, error_object, job_end, reservation_of
from spool_core.jobs.model import Job, Progress
from spool_core.jobs.outcome import Outcome
from spool_core.jobs.ports import ChunkLog, Conflict, EndGuard, JobEnd, JobStore
from spool_core.limits.model import Settlement
from spool_core.limits.service import RateLimiter, utc_day
from spool_core.models import ModelCatalog
from spool_core.observability import logger

# How long after a job's first dead letter a settled end that fails is followed by a bare one: the
# third receive, the dead-letter queue's visibility timeout (30 s) apart, is the first past it.
SETTLE_WINDOW_MS = 50_000


class DeadLetters:
    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        models: ModelCatalog,
        limiter: RateLimiter,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._models = models
        self._limiter = limiter
        self._clock = clock

    def handle(self, job_id: str, *, request_id: str | None = None) -> Outcome:
        """End the job ``failed`` unless a live lease says an attempt still holds it (then look again
        later: the dead letter returns after its visibility timeout), or its settled end failed
        within ``SETTLE_WINDOW_MS`` of its first dead letter. ``request_id``: the invocation's, named
        in the job's error."""
        token = uuid.uuid4().hex
        since: int | None = None
        for _ in range(3):
            job = self._jobs.get(job_id)
            if job is None or job.terminal:
                return Outcome.DONE
            now = int(self._clock() * 1000)
            if job.lease_live(now):
                return Outcome.RETRY
            try:
                if since is None:
                    since = self._jobs.dead_lettered_since(job_id, now)
                self._end(job, token, now, request_id, last=now - since >= SETTLE_WINDOW_MS)
            except Conflict:
                continue  # it moved (a late attempt ended it, or took it): decide again
            except _SettleLater:
                return Outcome.RETRY
            return Outcome.DONE
        return Outcome.RETRY

    def _end(self, job: Job, token: str, now: int, request_id: str | None, *, last: bool) -> None:
        def error(progress: Progress) -> dict[str, Any]:
            return error_object(
                "delivery_failed",
                f"The job could not be processed after {job.attempts} attempt(s) and was dead-lettered",
                {"attempts": job.attempts},
                ["Create a new job (with a new Idempotency-Key)", "Report the job_id if it keeps happening"],
                progress,
                request_id,
            )

        completed_at = rfc3339(from_epoch(now / 1000))
        reservation = reservation_of(job)
        guard = EndGuard("abandoned", token, now)
        end: JobEnd | None = None
        try:
            end, usage = end_from_log(job, "failed", self._chunks, self._models, completed_at, error=error)
            self._limiter.settled(
                job.job_id, reservation, usage, partial(self._jobs.end, job.job_id, end, guard)
            )
        except Conflict:
            raise
        except Exception as exc:
            if not last:
                logger.warning(
                    "could not settle a dead-lettered job; looking again at its next receive",
                    extra={"job_id": job.job_id, "reason": repr(exc)[:500]},
                )
                raise _SettleLater() from exc
            logger.exception(
                "could not settle a dead-lettered job; ending it with its slot released only",
                extra={"job_id": job.job_id},
            )
            if end is None:  # the log could not be read: the progress the job item recorded
                end = job_end(
                    job,
                    "failed",
                    job.progress,
                    (),
                    completed_at,
                    input_reported=job.input_reported,
                    error=error(job.progress),
                )
            bare = Settlement(job.job_id, (), utc_day(now), (), None, release_slot=reservation is not None)
            self._jobs.end(job.job_id, end, guard, bare)
        logger.warning("dead-lettered job marked failed", extra={"job_id": job.job_id})


class _SettleLater(Exception):
    """The settled end failed within the window: the dead letter comes back."""
