"""Reading a job's chunk log a page at a time: ``GET /v1/jobs/{id}/chunks``, its resume, and the SSE
and OpenAI-compatible streams that follow the log.

Apart from the job service (admission, listing, cancelling) so that a function that only reads the
log (``ChunksFunction``) loads none of admission's contexts, limits and models: its cold start, and
every page, pays for the log and the job's status alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from spool_core.clock import epoch_ms
from spool_core.errors import InvalidRequest
from spool_core.ids import plausible
from spool_core.jobs.cadence import Cadence, Watch
from spool_core.jobs.errors import JobNotFound
from spool_core.jobs.model import MAX_SEQUENCE_ID, TERMINAL, Chunk, Job, Status
from spool_core.jobs.ports import ChunkLog, JobStore, LogPage

MAX_WAIT_SECONDS = 20
DEFAULT_CHUNK_LIMIT = 500
MAX_CHUNK_LIMIT = 1000
# A running job's status, once read, serves the empty pages of the next two seconds: a job's end is
# seen from its end mark in the log; only a job that ended before end marks existed is seen ending
# that much later (never missed), and a terminal status is final.
STATUS_FRESH_SECONDS = 2.0
# A queued job's, for a quarter of a second: a stream waiting for the first token looks at the log
# every few ms, and need not read the job each time (a queued job's cancel is seen that much later).
QUEUED_FRESH_SECONDS = 0.25
FRESH_SECONDS: dict[str, float] = {"running": STATUS_FRESH_SECONDS, "queued": QUEUED_FRESH_SECONDS}


class ChunkPage(NamedTuple):
    """A page of the chunk log: the chunks after a cursor, and whether the job's log ends there."""

    job_id: str
    status: Status
    chunks: list[Chunk]
    next_after: int
    done: bool

    def view(self) -> dict[str, Any]:
        """The page as the API shows it."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "chunks": [chunk.public() for chunk in self.chunks],
            "next_after": self.next_after,
            "done": self.done,
        }


class ChunkPages:
    """One tenant's chunk log, read a page at a time (long-polled with ``wait``)."""

    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        *,
        cadence: Cadence | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._cadence = cadence or Cadence()
        self._clock = clock
        self._sleep = sleep
        self._statuses: dict[str, tuple[float, Status]] = {}  # job id -> (read at, status)

    @property
    def cadence(self) -> Cadence:
        """The chunk log's cadence: readers look for the next chunk when it is due."""
        return self._cadence

    def get(self, job_id: str) -> Job:
        """The whole job (a stream's end reads how it ended)."""
        job = self._jobs.get(job_id) if plausible(job_id) else None
        if job is None:
            raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
        return job

    def chunks(
        self, job_id: str, after: int = 0, limit: int = DEFAULT_CHUNK_LIMIT, wait: float = 0
    ) -> dict[str, Any]:
        """Chunks after ``after``; with ``wait``, long-poll until one exists or the job is terminal."""
        return self.chunk_page(job_id, after, limit, wait).view()

    def chunk_page(
        self, job_id: str, after: int = 0, limit: int = DEFAULT_CHUNK_LIMIT, wait: float = 0
    ) -> ChunkPage:
        """``chunks`` as the log has them (a stream reads their token counts to pace itself)."""
        if (
            not 0 <= after <= MAX_SEQUENCE_ID
            or not 1 <= limit <= MAX_CHUNK_LIMIT
            or not 0 <= wait <= MAX_WAIT_SECONDS
        ):
            raise InvalidRequest(
                f"after must be 0..{MAX_SEQUENCE_ID}, limit 1..1000, wait 0..20",
                details={"after": after, "limit": limit, "wait": wait},
                suggestions=["Use after=<last sequence_id you hold>, limit<=1000, wait<=20"],
            )
        if not plausible(job_id):
            raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
        deadline = self._clock() + wait
        # A waiting poll looks again when the next chunk is due (the cadence says when, from the
        # write times and sizes of the chunks the client holds, which the first look reads too), and
        # at least every 120 ms (an answer may end early).
        watch = Watch(self._cadence) if wait else None
        while True:
            # One read of the log tells what a page needs: new chunks, and whether the job ended (its
            # end mark, written with its end after every chunk: a read that shows it shows them). The
            # job's status beside it is a light read, and a running job's serves the pages of the next
            # two seconds.
            found = self._look(job_id, after, limit, watch)
            if found.end is not None:
                return ChunkPage(job_id, found.end.status, found.chunks, _next(found.chunks, after), True)
            status = self._status(job_id)
            if status in TERMINAL:
                # Ended, and this read missed the end mark (or the job ended before marks existed): a
                # strongly consistent read from here holds every chunk written before the end.
                again = self._chunks.page(job_id, after, limit)
                done = again.end is not None or len(again.chunks) < limit
                return ChunkPage(job_id, status, again.chunks, _next(again.chunks, after), done)
            remaining = deadline - self._clock()
            if found.chunks or remaining <= 0 or watch is None:
                running = "running" if found.chunks else status  # a page with chunks never says queued
                return ChunkPage(job_id, running, found.chunks, _next(found.chunks, after), False)
            self._sleep(min(watch.wait_ms(int(self._clock() * 1000)) / 1000, remaining))

    def _look(self, job_id: str, after: int, limit: int, watch: Watch | None) -> LogPage:
        """The contiguous chunks after ``after``, and the end mark if the page reaches it (an eventually
        consistent read: what it misses is seen at the next look). The first look of a waiting poll also
        reads the two chunks up to ``after``, whose write times tell ``watch`` when the next is due."""
        start = max(0, after - 2) if watch is not None and not watch.started else after
        page = self._chunks.page(job_id, start, limit + after - start, consistent=False)
        found: list[Chunk] = []
        for chunk in page.chunks:
            if chunk.sequence_id <= after:
                if watch is not None:
                    watch.saw(chunk.sequence_id, epoch_ms(chunk.created_at), chunk.tokens, chunk.tokens_total)
            elif chunk.sequence_id == after + len(found) + 1:
                found.append(chunk)
            else:
                return LogPage(found)  # never past a gap a lagging replica could show
        if watch is not None:
            watch.started = True
        return LogPage(found, page.end)

    def _status(self, job_id: str) -> Status:
        """The job's status for a page: read (eventually consistent, one attribute) unless a read of
        it that said ``running`` is under ``STATUS_FRESH_SECONDS`` old, or ``queued`` under
        ``QUEUED_FRESH_SECONDS`` (a page with chunks never says ``queued``)."""
        now = self._clock()
        seen = self._statuses.get(job_id)
        if seen is not None and now - seen[0] < FRESH_SECONDS.get(seen[1], 0):
            return seen[1]
        status = self._jobs.status(job_id)
        if status is None:
            raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
        self._statuses[job_id] = (now, status)
        return status


def _next(chunks: list[Chunk], after: int) -> int:
    return chunks[-1].sequence_id if chunks else after
