"""The dead-letter path: a job whose message could not be processed ends ``failed`` with a structured
error, its reservation settled, whatever input the message carries. It never loops and never leaves a
job running: when the settled end itself cannot be written, the job still ends, settling only its
concurrency slot, and the reason is logged."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from spool_core.clock import from_epoch, rfc3339
from spool_core.jobs.ending import end_from_log, error_object, reservation_of
from spool_core.jobs.model import Job, Progress
from spool_core.jobs.outcome import Outcome
from spool_core.jobs.ports import ChunkLog, Conflict, EndGuard, JobStore
from spool_core.limits.model import Settlement
from spool_core.limits.service import RateLimiter, utc_day
from spool_core.models import ModelCatalog
from spool_core.observability import logger


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
        later: the dead letter returns after its visibility timeout). ``request_id``: the invocation's,
        named in the job's error."""
        token = uuid.uuid4().hex
        for _ in range(3):
            job = self._jobs.get(job_id)
            if job is None or job.terminal:
                return Outcome.DONE
            now = int(self._clock() * 1000)
            if job.lease_live(now):
                return Outcome.RETRY
            try:
                self._end(job, token, now, request_id)
            except Conflict:
                continue  # it moved (a late attempt ended it, or took it): decide again
            return Outcome.DONE
        return Outcome.RETRY

    def _end(self, job: Job, token: str, now: int, request_id: str | None) -> None:
        def error(progress: Progress) -> dict[str, Any]:
            return error_object(
                "delivery_failed",
                f"The job could not be processed after {job.attempts} attempt(s) and was dead-lettered",
                {"attempts": job.attempts},
                ["Create a new job (with a new Idempotency-Key)", "Report the job_id if it keeps happening"],
                progress,
                request_id,
            )

        end, usage = end_from_log(
            job, "failed", self._chunks, self._models, rfc3339(from_epoch(now / 1000)), error=error
        )
        reservation = reservation_of(job)
        guard = EndGuard("abandoned", token, now)
        try:
            self._limiter.settled(
                job.job_id, reservation, usage, partial(self._jobs.end, job.job_id, end, guard)
            )
        except Conflict:
            raise
        except Exception:
            logger.exception(
                "could not settle a dead-lettered job; ending it with its slot released only",
                extra={"job_id": job.job_id},
            )
            bare = Settlement(job.job_id, (), utc_day(now), (), None, release_slot=reservation is not None)
            self._jobs.end(job.job_id, end, guard, bare)
        logger.warning("dead-lettered job marked failed", extra={"job_id": job.job_id})
