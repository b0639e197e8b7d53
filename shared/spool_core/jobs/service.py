"""The jobs API's logic: idempotent creation with admission, reading the log, cancelling.

Admission is one read (the key's claim and the tenant's usage state) and one transaction (the claim,
the reservation and the job): a reservation never exists without its job, and of concurrent first
requests with one key exactly one creates a job. A transaction cancelled because a limit's state moved
meanwhile is decided again on a fresh read; one cancelled because the key is taken answers as a retry.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from spool_core import tokens
from spool_core.chat import Message
from spool_core.clock import from_epoch, rfc3339
from spool_core.contexts.errors import refuse_empty_context_id
from spool_core.errors import DependencyUnavailable, InvalidRequest, PayloadTooLarge
from spool_core.ids import new_id
from spool_core.jobs.cadence import Cadence
from spool_core.jobs.ending import end_from_log, first_chunk_at, reservation_of
from spool_core.jobs.errors import (
    ContextTooLarge,
    IdempotencyKeyRequired,
    IdempotencyKeyReused,
    RequestInProgress,
)
from spool_core.jobs.model import (
    ACTIVE,
    TERMINAL,
    Chunk,
    Job,
    JobRequest,
    JobSummary,
    Progress,
    Segment,
    Status,
    Usage,
)
from spool_core.jobs.pages import (
    DEFAULT_CHUNK_LIMIT,
    ChunkPage,
    ChunkPages,
)
from spool_core.jobs.ports import (
    AdmissionRefused,
    ChunkLog,
    Claim,
    Conflict,
    EndGuard,
    JobEnd,
    JobQueue,
    JobStore,
    RequestStore,
)
from spool_core.jobs.stored import (
    MAX_INLINE_ONLY_BYTES,
    MAX_MESSAGES_BYTES,
    encoded_messages,
    messages_of,
    offload,
)
from spool_core.limits.errors import RateLimited, TokenLimitExceeded
from spool_core.limits.model import ModelUsage, Reservation, ReservationPlan, UsageState
from spool_core.limits.service import RateLimiter, utc_day
from spool_core.listing import DEFAULT_LIMIT, CursorCodec, Page, check_limit
from spool_core.models import ModelCatalog, ModelSpec
from spool_core.observability import logger
from spool_core.tenancy import Tenant
from spool_core.units import now_ms, usd

if TYPE_CHECKING:
    # Made only for a job that names a context: importing the context store's models is ~12 ms of
    # every cold start of the functions that create or read jobs (docs/decisions.md, cold start).
    from spool_core.contexts.service import ContextService

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
MAX_KEY_LENGTH = 255
STATUSES: tuple[Status, ...] = ("queued", "running", "completed", "failed", "cancelled")
ADMISSION_ATTEMPTS = 25  # reads and transactions, while concurrent admissions keep moving the state


class Created(NamedTuple):
    """The outcome of ``POST /v1/jobs``: a new job (202) or the replay of a finished one (200)."""

    job: Job
    replayed: bool
    headers: dict[str, str]


def _window_suggestions(
    request: JobRequest, model: ModelSpec, input_tokens: int, context_tokens: int, over: int
) -> list[str]:
    """What would make a request fit the model's window, the change that fits first: a smaller
    ``max_tokens`` where the input leaves room, then less context (only a request with one), fewer
    messages, a larger model."""
    suggestions = []
    room = min(model.context_window - input_tokens, model.max_output_tokens)
    if room >= 1:
        suggestions.append(f"Set max_tokens to at most {room:,} (the room {model.id}'s window leaves)")
    if context_tokens:
        suggestions.append(
            f"Remove about {over:,} tokens of context (PATCH /v1/contexts/{request.context_id} with 'delete')"
        )
    if len(request.messages) > 1:
        suggestions.append("Drop older messages")
    suggestions.append("Use a model with a larger context window (GET /v1/models)")
    return suggestions


def check_idempotency_key(key: str | None) -> str:
    """The key itself; ``idempotency_key_required`` when it is missing, ``invalid_request`` (naming
    the header) when it is longer than 255 characters."""
    if not key:
        raise IdempotencyKeyRequired(
            "The 'Idempotency-Key' header is required (1-255 characters)",
            details={"max_length": MAX_KEY_LENGTH},
        )
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"The 'Idempotency-Key' header has {len(key)} characters (at most {MAX_KEY_LENGTH})",
            details={"field": "Idempotency-Key", "length": len(key), "max_length": MAX_KEY_LENGTH},
            suggestions=["Send a shorter key, e.g. a UUID generated once per logical request"],
        )
    return key


def _stored_size_error(size: int, limit: int) -> PayloadTooLarge | None:
    """A job keeps its messages (so a retry or a worker can rebuild the prompt): on its item when they
    are small, in S3 otherwise (spool_core.jobs.stored), up to ``limit`` bytes. The refusal when they
    (``size`` bytes as stored) are larger, else None."""
    if size <= limit:
        return None
    return PayloadTooLarge(
        f"The messages are {size:,} bytes as stored; a job holds at most {limit:,}",
        details={"field": "messages", "param": "messages", "size_bytes": size, "limit_bytes": limit},
        suggestions=[
            "Upload large text as a context (POST /v1/contexts) and send its context_id with the job",
        ],
    )


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class JobService:
    def __init__(
        self,
        tenant: Tenant,
        jobs: JobStore,
        chunks: ChunkLog,
        queue: JobQueue,
        contexts: Callable[[], ContextService],
        models: ModelCatalog,
        limiter: RateLimiter,
        *,
        websocket_url: str | None = None,
        events_link: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        cadence: Cadence | None = None,
        requests: Callable[[], RequestStore] | None = None,
    ) -> None:
        self._tenant = tenant
        self._requests = requests  # where messages too large for a job item go (S3)
        self._jobs = jobs
        self._chunks = chunks
        self._queue = queue
        self._contexts = contexts
        self._models = models
        self._limiter = limiter
        self._websocket_url = websocket_url
        self._events_link = events_link
        self._clock = clock
        self._sleep = sleep
        self._pages = ChunkPages(jobs, chunks, cadence=cadence, clock=clock, sleep=sleep)

    @property
    def cadence(self) -> Cadence:
        """The chunk log's cadence: readers look for the next chunk when it is due."""
        return self._pages.cadence

    # ------------------------------------------------------------------ create
    def create(
        self,
        key: str | None,
        request: JobRequest,
        *,
        surface: str | None = None,
        echo: dict[str, Any] | None = None,
    ) -> Created:
        """Admit ``request`` once per ``key``. ``surface``: the OpenAI surface that made the job;
        ``echo``: what it shows of its request and the job does not keep (kept on the job as it is).
        Both belong to the request a key names (``JobRequest.fingerprint``)."""
        key = check_idempotency_key(key)
        messages = encoded_messages(request)  # once: their size here, the S3 object once admitted
        too_large = _stored_size_error(
            len(messages), MAX_MESSAGES_BYTES if self._requests is not None else MAX_INLINE_ONLY_BYTES
        )
        if too_large is not None:
            # Messages longer than the model's window are told so (context_too_large) before being
            # told they do not fit a job item: the window is what the caller has to change first.
            self._admit(self._models.resolve(request.model), request)
            raise too_large
        fingerprint, key_hash = request.fingerprint(surface, echo), idempotency_hash(key)
        known = self._models.get(request.model)
        job: Job | None = None
        admitted: tuple[Job, UsageState, ReservationPlan] | None = None
        for attempt in range(ADMISSION_ATTEMPTS):
            claim, state = self._jobs.admission_state(key_hash, known.id if known else "", utc_day(now_ms()))
            if claim is not None:
                if job is not None and claim.job_id == job.job_id and admitted is not None:
                    break  # an attempt whose reply was lost had been applied
                return self._replay(claim, fingerprint, state)
            if job is None:
                # a new job only (a replay of one accepted before this check answers as before); here,
                # not in the model: a stored request reads back as it was written
                refuse_empty_context_id(request.context_id)
                job = self._new_job(request, fingerprint, echo)
            model = self._models.resolve(job.model_resolved)
            plan = self._plan(job, model, state)
            job = job.model_copy(update={"reservation": plan.reservation.item()})
            if job.messages_blob is None:  # once admission would take it: a refusal stores nothing
                job = offload(job, self._requests, messages)
            admitted = (job, state, plan)
            claim = self._claim(key_hash, job)
            try:
                self._jobs.admit(job, claim, plan)
            except AdmissionRefused as refused:
                if refused.claim is None:
                    self._sleep(random.uniform(0, 0.005 * (attempt + 1)))  # a limit moved: read again
                    continue
                if refused.claim.job_id == job.job_id:
                    break
                return self._replay(refused.claim, fingerprint, state)
            except (TypeError, ValueError, ArithmeticError):
                raise  # a value the store cannot take: never sent, so no reply was lost; not retryable
            except Exception:  # the reply was lost: the next read says whether it was applied
                logger.warning("admission write failed; reading again", exc_info=True)
                continue
            break
        else:
            raise DependencyUnavailable(
                "Too many concurrent admissions for this tenant; the job was not created",
                suggestions=["Retry with the same Idempotency-Key"],
            )
        assert admitted is not None
        job, state, plan = admitted
        self._enqueue(job, claim, plan.reservation)
        return Created(job, replayed=False, headers=self._limiter.headers(state, plan))

    def _new_job(self, request: JobRequest, fingerprint: str, echo: dict[str, Any] | None = None) -> Job:
        model = self._models.resolve(request.model)
        input_tokens, manifest = self._admit(model, request)  # refusals here write nothing
        created_at = rfc3339(from_epoch(self._clock()))
        return Job(
            job_id=new_id("job"),
            tenant_id=self._tenant.id,
            status="queued",
            request=request,
            fingerprint=fingerprint,
            model_requested=request.model,
            model_resolved=model.id,
            segments=[Segment(model=model.id)],
            created_at=created_at,
            estimate={"input_raw": input_tokens},
            context_manifest=manifest,
            echo=echo,
        )

    def _plan(self, job: Job, model: ModelSpec, state: UsageState) -> ReservationPlan:
        assert job.estimate is not None
        estimate = self._limiter.estimate(state, int(job.estimate["input_raw"]), job.request.max_tokens)
        cost = model.cost_nanos(estimate.input_tokens, estimate.output_tokens)
        try:
            plan = self._limiter.plan(state, estimate.total, cost)
        except RateLimited as limited:
            refused = limited.details.get("window") if isinstance(limited, TokenLimitExceeded) else None
            limited.headers.update(self._limiter.headers(state, window=refused))
            raise
        object.__setattr__(job, "usage", Usage(estimated_tokens=estimate.total))
        object.__setattr__(job, "estimate", estimate._asdict())
        return plan

    def _claim(self, key_hash: str, job: Job) -> Claim:
        return Claim(
            key_hash=key_hash,
            job_id=job.job_id,
            fingerprint=job.fingerprint,
            created_at=job.created_at,
            expires_at_s=int(self._clock()) + IDEMPOTENCY_TTL_SECONDS,
        )

    def _enqueue(self, job: Job, claim: Claim, reservation: Reservation) -> None:
        """Queue the job; if that fails, undo the admission so a retry with the key starts afresh
        (and if the undo fails too, the sweeper queues the job within minutes)."""
        try:
            self._queue.send(job.job_id, self._tenant.id)
        except Exception as exc:
            try:
                self._limiter.settled(job.job_id, reservation, (), partial(self._jobs.withdraw, job, claim))
            except Exception:
                logger.exception("could not withdraw an unqueued job; the sweeper will queue it")
            raise DependencyUnavailable(
                "The job could not be queued", suggestions=["Retry with the same Idempotency-Key"]
            ) from exc

    def _replay(self, claim: Claim, fingerprint: str, state: UsageState) -> Created:
        if claim.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used with a different request body",
                details={"job_id": claim.job_id},
            )
        job = self._jobs.get(claim.job_id)
        if job is None or job.status in ACTIVE:
            progress = self.progress(job) if job else Progress().model_dump()
            raise RequestInProgress(
                f"The job created with this Idempotency-Key is {job.status if job else 'queued'}",
                details={
                    "job_id": claim.job_id,
                    "status": job.status if job else "queued",
                    "progress": {
                        "tokens_generated": progress["tokens_generated"],
                        "last_sequence_id": progress["last_sequence_id"],
                    },
                },
            )
        return Created(job, replayed=True, headers=self._limiter.headers(state))

    def _admit(self, model: ModelSpec, request: JobRequest) -> tuple[int, str | None]:
        """Check the request fits the model; returns its input tokens (tiktoken x family calibration)
        and the key of the context version it counted (the version the job will read).
        The window (input + ``max_tokens``) is checked before the model's output limit, as DESIGN.md
        names ``context_too_large`` for any request over the window."""
        family = tokens.family_tokenizer(model.family)
        context_tokens, manifest, loaded = 0, None, None
        if request.context_id:
            contexts = self._contexts()
            loaded = contexts.load(request.context_id)  # 404 / 410
            context_tokens = contexts.prompt_tokens(loaded, family.encoding)
            manifest = loaded.record.manifest_key
        message_tokens = tokens.count_messages((m.model_dump() for m in request.messages), family.encoding)
        input_tokens = tokens.calibrate(context_tokens + message_tokens, family.calibration)
        requested = input_tokens + request.max_tokens
        over = requested - model.context_window
        if loaded is not None and 0 < over <= tokens.calibrate(
            contexts.joining_bound(loaded.manifest), family.calibration
        ):
            # Each file counted on its own is about a token above the joined text: over the window by
            # no more than that can be, the joined text decides (a request that fits is not refused).
            context_tokens = contexts.exact_prompt_tokens(loaded.manifest, family.encoding)
            input_tokens = tokens.calibrate(context_tokens + message_tokens, family.calibration)
            requested = input_tokens + request.max_tokens
        if requested > model.context_window:
            over = requested - model.context_window
            raise ContextTooLarge(
                f"Request size ({requested:,} tokens) exceeds {model.id}'s window ({model.context_window:,})",
                details={
                    "tokens_requested": requested,
                    "tokens_limit": model.context_window,
                    "tokens_over": over,
                    "input_tokens": input_tokens,
                    "max_tokens": request.max_tokens,
                },
                suggestions=_window_suggestions(request, model, input_tokens, context_tokens, over),
            )
        if request.max_tokens > model.max_output_tokens:
            raise InvalidRequest(
                f"max_tokens {request.max_tokens:,} exceeds {model.id}'s limit ({model.max_output_tokens:,})",
                details={
                    "param": "max_tokens",
                    "max_tokens": request.max_tokens,
                    "limit": model.max_output_tokens,
                },
                suggestions=[f"Set max_tokens to at most {model.max_output_tokens}"],
            )
        return input_tokens, manifest

    # ------------------------------------------------------------------ read
    def get(self, job_id: str) -> Job:
        return self._pages.get(job_id)

    def messages(self, job: Job) -> tuple[Message, ...]:
        """The job's messages, from its item or from S3 (a read of the whole request there)."""
        return messages_of(job, self._requests)

    def progress(self, job: JobSummary, last: Chunk | None = None, *, live: bool = True) -> dict[str, int]:
        """Current progress: the job item's once it is terminal, the chunk log's last entry while it
        runs (``last`` when the caller already read it); a job never started has none. Not ``live``
        (a listing), a running job's progress is the one its worker recorded at its last lease
        renewal (at most a third of the lease old), read without touching the chunk log."""
        if job.terminal:
            return job.progress.model_dump()
        if job.status == "queued" and job.attempts == 0:
            return Progress().model_dump()
        if not live:
            return job.progress.model_dump()
        return Progress.up_to(last or self._chunks.last(job.job_id)).model_dump()

    def view(self, job: JobSummary, *, with_output: bool = True, live: bool = True) -> dict[str, Any]:
        """The job resource of DESIGN.md; without ``output`` (``?output=false``) it is small and
        costs no read of the chunk log beyond its first entry, whatever the output's size; not
        ``live`` (a listing's entries) it reads nothing at all: the job's item says it all."""
        if with_output and not isinstance(job, Job):
            raise TypeError("a job's output is on its item, not on its summary")
        output = job.output if isinstance(job, Job) else None
        first_token_at = job.first_token_at
        last: Chunk | None = None
        if not with_output:
            if first_token_at is None and job.attempts and live:
                first_token_at = first_chunk_at(self._chunks, job.job_id)
        elif output is None and job.attempts == 0:
            output = ""  # never started: nothing in the log
        elif output is None:  # running, or too large to keep on the item: the log has it
            chunks = list(self._chunks.all(job.job_id))
            output = "".join(chunk.text for chunk in chunks)
            first_token_at = first_token_at or (chunks[0].created_at if chunks else None)
            last = chunks[-1] if chunks else None
        links = {
            "self": f"/v1/jobs/{job.job_id}",
            "chunks": f"/v1/jobs/{job.job_id}/chunks",
            "subscribe": self._websocket_url,
        }
        if self._events_link is not None:
            links["events"] = self._events_link(job.job_id)
        return {
            "job_id": job.job_id,
            "status": job.status,
            "model": {
                "requested": job.model_requested,
                "resolved": job.model_resolved,
                "fallback_used": job.fallback_used,
                "segments": [s.model_dump() for s in job.segments],
            },
            "progress": self.progress(job, last, live=live),
            "usage": job.usage.model_dump(),
            "cost_usd": usd(job.cost_nanos),
            **({"output": output} if with_output else {}),
            "error": job.error,
            "finish_reason": job.finish_reason,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "first_token_at": first_token_at,
            "completed_at": job.completed_at,
            "links": links,
        }

    def list_jobs(
        self,
        cursors: CursorCodec,
        *,
        status: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page:
        """``GET /v1/jobs``: the tenant's jobs newest first, of one status if given, without output.
        One Query a page (``limit`` + 1 items: the extra one says whether a next page exists)."""
        wanted = _check_status(status or None)
        check_limit(limit)
        where = f"status={wanted}" if wanted else ""
        before = cursors.decode(cursor, self._tenant, "jobs", where) if cursor else None
        listed = self._jobs.list_for_tenant(wanted, limit + 1, before)
        page = listed[:limit]
        more = len(listed) > limit
        return Page(
            data=[self.view(entry.job, with_output=False, live=False) for entry in page],
            next_cursor=cursors.encode(self._tenant, "jobs", where, page[-1].position) if more else None,
        )

    def chunks(
        self, job_id: str, after: int = 0, limit: int = DEFAULT_CHUNK_LIMIT, wait: float = 0
    ) -> dict[str, Any]:
        """Chunks after ``after``; with ``wait``, long-poll until one exists or the job is terminal."""
        return self._pages.chunks(job_id, after, limit, wait)

    def chunk_page(
        self, job_id: str, after: int = 0, limit: int = DEFAULT_CHUNK_LIMIT, wait: float = 0
    ) -> ChunkPage:
        """``chunks`` as the log has them (``spool_core.jobs.pages``)."""
        return self._pages.chunk_page(job_id, after, limit, wait)

    def rate_limit_headers(self) -> dict[str, str]:
        state, _ = self._limiter.state()
        return self._limiter.headers(state)

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> Job:
        """Idempotent: a queued job is cancelled at once (its reservation given back), a running one
        at its worker's next flush. A running job no live lease holds (its worker died, or handed it
        over to a continuation still queued) is ended here, with what it wrote, as the dead-letter
        path would: no worker may flush for minutes (until its message comes back)."""
        token = uuid.uuid4().hex
        for _ in range(5):
            job = self.get(job_id)
            if job.terminal:
                return job
            now = int(self._clock() * 1000)
            try:
                if job.status == "running":  # a live lease's worker stops itself; else nobody will
                    if job.lease_live(now):
                        return self._jobs.request_cancel(job_id)
                    return self._end_unheld(job, token, now)
                reservation = reservation_of(job)
                end = JobEnd(
                    status="cancelled",
                    progress=Progress(),
                    usage=Usage(estimated_tokens=job.usage.estimated_tokens),
                    cost_nanos=0,
                    completed_at=rfc3339(from_epoch(self._clock())),
                    output="",
                    subscribed=job.subscribed,
                )
                # It used nothing, and still counts once in the usage, as every job that ended does.
                nothing = (ModelUsage(job.model_resolved, 0, 0, 0),)
                guard = EndGuard("queued", token)
                return self._limiter.settled(
                    job_id, reservation, nothing, partial(self._jobs.end, job_id, end, guard)
                )
            except Conflict:
                continue  # it moved on (started or finished) meanwhile: decide again
        return self.get(job_id)

    def _end_unheld(self, job: Job, token: str, now: int) -> Job:
        """Cancel a running job whose lease ran out: only while no attempt took it meanwhile (the
        ``abandoned`` guard), its partial output kept in the log and what it used settled."""
        end, usage = end_from_log(
            job, "cancelled", self._chunks, self._models, rfc3339(from_epoch(now / 1000))
        )
        reservation = reservation_of(job)
        guard = EndGuard("abandoned", token, now)
        ended = self._limiter.settled(
            job.job_id, reservation, usage, partial(self._jobs.end, job.job_id, end, guard)
        )
        logger.info("cancelled a job no worker held", extra={"job_id": job.job_id})
        return ended


def _check_status(status: str | None) -> Status | None:
    if status is None or status in STATUSES:
        return status
    raise InvalidRequest(
        f"Unknown status {status[:40]!r}",
        details={"fields": [{"field": "status", "value": status[:40], "allowed": list(STATUSES)}]},
        suggestions=[f"Use one of: {', '.join(STATUSES)}", "Omit status to list jobs of every status"],
    )


def is_terminal(status: str) -> bool:
    return status in TERMINAL


__all__ = ["Chunk", "Created", "JobService", "idempotency_hash", "is_terminal"]
