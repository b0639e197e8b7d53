"""The dead-letter path: a job whose message could not be processed ends ``failed`` with a structured
error, its reservation settled, whatever input the message carries. It never loops and never leaves a
job running: when the settled end cannot be written (a throttled or unanswered call, a log that cannot
be read), the dead letter is looked at again after its visibility timeout, and at its
``SETTLE_RECEIVES``-th receive the job still ends, settling only its concurrency slot, with the reason
logged.

The receives are counted on the job item, not read from SQS: SQS does not reset a message's
``ApproximateReceiveCount`` when it moves it to the dead-letter queue, so there it starts past the
source queue's ``maxReceiveCount``, a number this function would need to know. Each receive also
touches the job's pending time, so the sweeper, which sends a running job idle for 13 minutes back to
the workers, leaves a dead-lettered one to its dead letter (which arrives ~12 minutes after the last
lease) while the retries last; it is the backstop again 13 minutes after the last receive."""

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

# The receives of a dead letter whose settled end fails before the job ends bare: the dead-letter
# queue's visibility timeout (30 s) apart, ~1 minute for a passing failure to pass.
SETTLE_RECEIVES = 3


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
        later: the dead letter returns after its visibility timeout), or its settled end failed on a
        receive before the ``SETTLE_RECEIVES``-th. ``request_id``: the invocation's, named in the
        job's error."""
        token = uuid.uuid4().hex
        receives: int | None = None
        for _ in range(3):
            job = self._jobs.get(job_id)
            if job is None or job.terminal:
                return Outcome.DONE
            now = int(self._clock() * 1000)
            if job.lease_live(now):
                return Outcome.RETRY
            try:
                if receives is None:
                    receives = self._jobs.count_dead_letter(job_id, now)
                self._end(job, token, now, request_id, last=receives >= SETTLE_RECEIVES)
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
    """The settled end failed on a receive before the last: the dead letter comes back."""
