"""What the jobs logic needs from storage and the queue, as named operations, each one atomic.

The job store is bound to one tenant's scope. Every conditional write is safe to retry: when a write
was applied but its reply was lost, the retry finds the record carrying the caller's own job id or
lease token and counts as done, never as a conflict (see docs/decisions.md, "Indeterminate writes").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from spool_core.jobs.model import Chunk, EndMark, Job, JobSummary, Progress, Segment, Status, Usage

if TYPE_CHECKING:  # in annotations only: a reader of the log loads none of the limits
    from spool_core.limits.model import ReservationPlan, Settlement, UsageState


class Conflict(Exception):
    """A conditional write found the item in another state (``current``, when the store returned it)."""

    def __init__(self, current: Mapping[str, Any] | None = None) -> None:
        super().__init__("conditional write lost")
        self.current = current


class Claim(NamedTuple):
    """The idempotency record: which job a tenant's key created, and the body it was created with."""

    key_hash: str
    job_id: str
    fingerprint: str
    created_at: str
    expires_at_s: int  # TTL (epoch seconds)


class AdmissionRefused(Exception):
    """The admission transaction was cancelled. ``claim`` is the record that already held the key
    (then nothing else matters); otherwise a limit's state moved since it was read."""

    def __init__(self, claim: Claim | None = None) -> None:
        super().__init__("admission refused by a condition")
        self.claim = claim


class JobEnd(NamedTuple):
    """The final state of a job, written once."""

    status: Status
    progress: Progress
    usage: Usage
    cost_nanos: int
    completed_at: str
    output: str | None = None
    error: dict[str, Any] | None = None
    first_token_at: str | None = None
    segments: tuple[Segment, ...] | None = None
    input_reported: Mapping[str, int] = {}  # one shared default: a Mapping, so never written to
    finish_reason: str | None = None  # of a completed job: stop | length | content_filter
    # Whether the writer knows of a WebSocket subscriber: the end mark (written with every end) is then
    # marked live, for the fanout. A writer that knows of none is refused if one subscribed meanwhile,
    # and the store retries knowing it.
    subscribed: bool = False


class Signals(NamedTuple):
    """What a worker learns at each flush from the job item."""

    cancel: bool = False
    subscribed: bool = False


class EndGuard(NamedTuple):
    """Who may write the end: the lease holder (``lease``), a cancel of a job nobody started
    (``queued``), or the dead-letter path once no live lease holds the job (``abandoned``).
    ``token`` is recorded as ``ended_by``, so a retry of an applied end recognizes it."""

    kind: Literal["lease", "queued", "abandoned"]
    token: str
    now_ms: int = 0


class ListedJob(NamedTuple):
    """A job as a listing has it: its summary and its list position (creation time, then id)."""

    position: str
    job: JobSummary


class JobStore(Protocol):
    def get(self, job_id: str) -> Job | None: ...

    def list_for_tenant(self, status: Status | None, limit: int, before: str | None) -> list[ListedJob]:
        """The tenant's jobs (of ``status``, if given) newest first, at most ``limit``, positioned
        strictly before ``before`` (from the newest when None). Jobs stored before listing existed
        carry no position and are not listed."""

    # ------------------------------------------------------------------ admission
    def admission_state(self, key_hash: str, model_id: str, day: str) -> tuple[Claim | None, UsageState]:
        """The key's claim, if any, and the tenant's usage state: one read."""

    def admit(self, job: Job, claim: Claim, plan: ReservationPlan) -> None:
        """The claim, the reservation and the job in one transaction. ``AdmissionRefused`` when a
        condition failed; an earlier attempt of this very admission that was applied is success."""

    def withdraw(self, job: Job, claim: Claim, settlement: Settlement) -> None:
        """Undo an admission whose job could not be queued: delete job and claim, give back the
        reservation (one transaction, conditional on the job still being queued; ``SettlementStale``
        when only what the settlement was computed against moved)."""

    # ------------------------------------------------------------------ the worker's lease
    def take_lease(self, job_id: str, token: str, now_ms: int, until_ms: int) -> Job:
        """Start an attempt (counted in ``attempts``): the job must be queued, or running with an
        expired lease. ``Conflict`` otherwise, with the job as it is (``None`` if there is none)."""

    def renew_lease(
        self, job_id: str, token: str, until_ms: int, progress: Progress, first_token_at: str | None
    ) -> None:
        """Extend the lease (and record progress); ``Conflict`` if another attempt owns the job."""

    def hand_over(self, job_id: str, token: str, progress: Progress, input_reported: dict[str, int]) -> None:
        """Release the lease so a new invocation continues at once (a yield at the time limit)."""

    def switch_model(self, job_id: str, token: str, segment: Segment, input_reported: dict[str, int]) -> Job:
        """Record that ``segment.model`` serves the job from ``segment.from_sequence_id`` on."""

    # ------------------------------------------------------------------ the end
    def end(self, job_id: str, end: JobEnd, guard: EndGuard, settlement: Settlement) -> Job:
        """The terminal status and the settlement in one transaction; ``Conflict`` (with the current
        item) when the guard does not hold, ``SettlementStale`` (nothing written) when it does but a
        bucket the settlement was computed against moved (its limit, refund counter or TAT)."""

    def request_cancel(self, job_id: str) -> Job:
        """Flag a running job for cancellation (its worker stops at its next flush); ``Conflict`` if
        it is not running."""

    def signals(self, job_id: str) -> Signals:
        """What the worker checks once per flush: whether a cancel was requested and whether a
        WebSocket client subscribed. A light read (eventually consistent, two attributes); what it
        misses by replication lag is seen a flush later."""

    def mark_subscribed(self, job_id: str) -> Job:
        """Record that the job has a WebSocket subscriber (idempotent), unless it has ended; the job as
        it is then. ``Conflict`` if there is no such job."""

    def status(self, job_id: str) -> Status | None:
        """The job's status alone (``None``: no such job), eventually consistent: a terminal status
        it returns is final; a stale ``queued``/``running`` only delays the reader's ``done``."""

    def requeue(self, job_id: str, seen_pending_ms: int, now_ms: int) -> bool:
        """Claim the right to re-send a forgotten job's message (the sweeper): False when someone
        touched the job since ``seen_pending_ms``."""

    def dead_lettered_since(self, job_id: str, now_ms: int) -> int:
        """Record a receive of the job's dead letter: when its dead letters were first received since
        its last lease was taken (kept; a new lease starts again), returned; and touch its pending
        time (a dead letter is activity: the sweeper leaves the job to it). ``Conflict`` when the
        job has ended or an attempt's lease on it is live."""


class LogPage(NamedTuple):
    """Chunks after a cursor, in order, and the job's end mark when the page reaches it (every chunk
    of the job comes before it)."""

    chunks: list[Chunk]
    end: EndMark | None = None


class ChunkLog(Protocol):
    def append(self, job_id: str, chunk: Chunk) -> None:
        """Write a chunk that must not exist yet; ``Conflict`` if another writer holds its sequence id
        (the same writer's earlier write of it is success)."""

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        """Up to ``limit`` chunks after ``after``, in order. ``consistent=False``: an eventually
        consistent read (half the cost), for polls whose next look catches what this one missed."""

    def page(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> LogPage:
        """As ``after``, and the end mark if the job has ended and no more than ``limit`` chunks remain:
        a reader learns that the job ended from the same read."""

    def last(self, job_id: str) -> Chunk | None: ...

    def all(self, job_id: str) -> Iterator[Chunk]: ...


class JobQueue(Protocol):
    def send(
        self,
        job_id: str,
        tenant_id: str,
        *,
        continuation: int = 0,
        stalled_at: int | None = None,
        circuit_wait_since_ms: int | None = None,
        delay_seconds: int = 0,
    ) -> None:
        """Queue the job's message, received no sooner than ``delay_seconds`` from now (0..900, as SQS
        allows); the other fields are the message's (spool_core.queue.JobMessage)."""


class SweptQueue(JobQueue, Protocol):
    """The queue as the sweeper sees it: it sends, and it tells how many messages wait."""

    def waiting(self) -> int:
        """Messages a worker could receive now (approximate, as SQS counts them): not those in
        flight, nor those delayed (a job waiting on open circuits is no backlog)."""


class PendingJob(NamedTuple):
    tenant_id: str
    job_id: str
    pending_since_ms: int


class PendingJobs(Protocol):
    """The jobs not yet ended, oldest activity first, across tenants (the sweeper's view)."""

    def older_than(self, before_ms: int, limit: int) -> list[PendingJob]: ...


class RequestStore(Protocol):
    """Where the messages of a job too large for its item go (S3, under the tenant's prefix), by the
    SHA-256 of their bytes: a retried create writes the same object again."""

    def put(self, data: bytes) -> str:
        """Store ``data``; its SHA-256 (hex)."""

    def get(self, sha256: str) -> bytes:
        """The bytes stored under ``sha256``; ``KeyError`` when there are none (expired)."""
