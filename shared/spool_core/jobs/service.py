"""The jobs API's logic: idempotent creation with admission, reading the log, cancelling."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from spool_core import tokens
from spool_core.clock import from_epoch, rfc3339
from spool_core.contexts.service import ContextService
from spool_core.errors import DependencyUnavailable, InvalidRequest
from spool_core.ids import new_id
from spool_core.jobs.errors import (
    ContextTooLarge,
    IdempotencyKeyRequired,
    IdempotencyKeyReused,
    JobNotFound,
    RequestInProgress,
)
from spool_core.jobs.model import ACTIVE, TERMINAL, Chunk, Job, JobRequest, Usage
from spool_core.jobs.ports import ChunkLog, Conflict, JobQueue, JobStore
from spool_core.limits.errors import RateLimited
from spool_core.limits.service import RateLimiter, settle
from spool_core.models import ModelCatalog, ModelSpec
from spool_core.tenancy import Tenant

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
JOB_TTL_SECONDS = 30 * 24 * 3600
MAX_KEY_LENGTH = 255
MAX_WAIT_SECONDS = 20
DEFAULT_CHUNK_LIMIT = 500
MAX_CHUNK_LIMIT = 1000
MAX_POLL_INTERVAL = 0.1


@dataclass(frozen=True)
class Created:
    """The outcome of ``POST /v1/jobs``: a new job (202) or the replay of a finished one (200)."""

    job: Job
    replayed: bool


def check_idempotency_key(key: str | None) -> str:
    """The key itself, or ``idempotency_key_required`` when it is missing or longer than 255 characters."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyRequired(
            "The 'Idempotency-Key' header is required (1-255 characters)"
            if not key
            else f"The 'Idempotency-Key' header has {len(key)} characters (at most {MAX_KEY_LENGTH})",
            details={"max_length": MAX_KEY_LENGTH},
        )
    return key


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class JobService:
    def __init__(
        self,
        tenant: Tenant,
        jobs: JobStore,
        chunks: ChunkLog,
        queue: JobQueue,
        contexts: ContextService,
        models: ModelCatalog,
        limiter: RateLimiter,
        *,
        websocket_url: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.05,
    ) -> None:
        self._tenant = tenant
        self._jobs = jobs
        self._chunks = chunks
        self._queue = queue
        self._contexts = contexts
        self._models = models
        self._limiter = limiter
        self._websocket_url = websocket_url
        self._clock = clock
        self._sleep = sleep
        self._poll_interval = poll_interval

    # ------------------------------------------------------------------ create
    def create(self, key: str | None, request: JobRequest) -> Created:
        key = check_idempotency_key(key)
        fingerprint = request.fingerprint()
        key_hash = idempotency_hash(key)
        existing = self._jobs.idempotency_record(key_hash)
        if existing is not None:
            return self._replay(existing, fingerprint)

        model = self._models.resolve(request.model)
        input_tokens = self._admit(model, request)  # refusals here write nothing
        now = self._clock()
        job_id, created_at = new_id("job"), rfc3339(from_epoch(now))
        try:
            # Claim the key first: of concurrent first requests exactly one gets past this write,
            # and only that one reserves tokens, so its twins never spend the tenant's limits.
            self._jobs.claim(key_hash, job_id, fingerprint, created_at, int(now + IDEMPOTENCY_TTL_SECONDS))
        except Conflict as lost:
            record = lost.current or self._jobs.idempotency_record(key_hash)
            if record is None:
                raise DependencyUnavailable(
                    "The idempotency record could not be read; retry with the same key"
                ) from None
            return self._replay(record, fingerprint)
        estimate = self._limiter.estimate(model.id, input_tokens, request.max_tokens)
        try:
            reservation = self._limiter.reserve(
                estimate.total, model.cost_usd(estimate.input_tokens, estimate.output_tokens)
            )
        except RateLimited as limited:
            self._jobs.discard(job_id, key_hash)
            limited.headers.update(self._limiter.headers())
            raise
        job = Job(
            job_id=job_id,
            tenant_id=self._tenant.id,
            status="queued",
            request=request,
            fingerprint=fingerprint,
            model_requested=request.model,
            model_resolved=model.id,
            usage=Usage(estimated_tokens=estimate.total),
            estimate=asdict(estimate),
            reservation=asdict(reservation),
            created_at=created_at,
        )
        try:
            self._jobs.create(job)
            self._queue.send(job.job_id, self._tenant.id)
        except Exception as exc:
            self._jobs.discard(job_id, key_hash)
            self._limiter.cancel(reservation)
            raise DependencyUnavailable(
                "The job could not be queued", suggestions=["Retry with the same Idempotency-Key"]
            ) from exc
        return Created(job, replayed=False)

    def _replay(self, record: dict[str, Any] | Any, fingerprint: str) -> Created:
        if record["fingerprint"] != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used with a different request body",
                details={"job_id": record["job_id"]},
            )
        job = self._jobs.get(record["job_id"])
        if job is None:  # the first request is between its two writes, or was discarded
            raise RequestInProgress(
                "A request with this Idempotency-Key is being processed",
                details={
                    "job_id": record["job_id"],
                    "status": "queued",
                    "progress": {"tokens_generated": 0, "last_sequence_id": 0},
                },
            )
        if job.status in ACTIVE:
            progress = self.progress(job)
            raise RequestInProgress(
                f"The job created with this Idempotency-Key is {job.status}",
                details={
                    "job_id": job.job_id,
                    "status": job.status,
                    "progress": {
                        "tokens_generated": progress["tokens_generated"],
                        "last_sequence_id": progress["last_sequence_id"],
                    },
                },
            )
        return Created(job, replayed=True)

    def rate_limit_headers(self) -> dict[str, str]:
        return self._limiter.headers()

    def _admit(self, model: ModelSpec, request: JobRequest) -> int:
        """Check the request fits the model; returns its input tokens (tiktoken x family calibration)."""
        if request.max_tokens > model.max_output_tokens:
            raise InvalidRequest(
                f"max_tokens {request.max_tokens:,} exceeds {model.id}'s limit ({model.max_output_tokens:,})",
                details={"max_tokens": request.max_tokens, "limit": model.max_output_tokens},
                suggestions=[f"Set max_tokens to at most {model.max_output_tokens}"],
            )
        family = tokens.family_tokenizer(model.family)
        context_tokens = 0
        if request.context_id:
            loaded = self._contexts.load(request.context_id)  # 404 / 410
            context_tokens = self._contexts.prompt_tokens(loaded, family.encoding)
        message_tokens = tokens.count_messages((m.model_dump() for m in request.messages), family.encoding)
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
                suggestions=[
                    f"Remove about {over:,} tokens of context (PATCH /v1/contexts/{{id}} with 'delete')",
                    "Reduce max_tokens or drop older messages",
                    "Use a model with a larger context window (GET /v1/models)",
                ],
            )
        return input_tokens

    # ------------------------------------------------------------------ read
    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
        return job

    def progress(self, job: Job, last: Chunk | None = None) -> dict[str, int]:
        """Current progress: the job item's once it is terminal, the chunk log's last entry before
        (``last`` when the caller already read it)."""
        if job.terminal:
            return job.progress.model_dump()
        last = last or self._chunks.last(job.job_id)
        if last is None:
            return {"tokens_generated": 0, "last_sequence_id": 0, "chunks_written": 0}
        return {
            "tokens_generated": last.tokens_total,
            "last_sequence_id": last.sequence_id,
            "chunks_written": last.sequence_id,
        }

    def view(self, job: Job) -> dict[str, Any]:
        """The job resource of DESIGN.md."""
        output = job.output
        first_token_at = job.first_token_at
        last: Chunk | None = None
        if output is None:  # running, or too large to keep on the item: the log has it
            chunks = list(self._chunks.all(job.job_id))
            output = "".join(chunk.text for chunk in chunks)
            first_token_at = first_token_at or (chunks[0].created_at if chunks else None)
            last = chunks[-1] if chunks else None
        links = {
            "self": f"/v1/jobs/{job.job_id}",
            "chunks": f"/v1/jobs/{job.job_id}/chunks",
            "subscribe": self._websocket_url,
        }
        return {
            "job_id": job.job_id,
            "status": job.status,
            "model": {
                "requested": job.model_requested,
                "resolved": job.model_resolved,
                "fallback_used": job.fallback_used,
            },
            "progress": self.progress(job, last),
            "usage": job.usage.model_dump(),
            "cost_usd": job.cost_usd,
            "output": output,
            "error": job.error,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "first_token_at": first_token_at,
            "completed_at": job.completed_at,
            "links": links,
        }

    def chunks(
        self, job_id: str, after: int = 0, limit: int = DEFAULT_CHUNK_LIMIT, wait: float = 0
    ) -> dict[str, Any]:
        """Chunks after ``after``; with ``wait``, long-poll until one exists or the job is terminal."""
        if after < 0 or not 1 <= limit <= MAX_CHUNK_LIMIT or not 0 <= wait <= MAX_WAIT_SECONDS:
            raise InvalidRequest(
                "after must be >= 0, limit 1..1000, wait 0..20",
                details={"after": after, "limit": limit, "wait": wait},
                suggestions=["Use after=<last sequence_id you hold>, limit<=1000, wait<=20"],
            )
        deadline = self._clock() + wait
        interval = self._poll_interval
        while True:
            job = self.get(job_id)  # status first: a terminal job's chunks are all written before it
            found = self._chunks.after(job_id, after, limit)
            if found or job.terminal or self._clock() >= deadline:
                break
            self._sleep(interval)
            # A waiting client costs two reads a poll: fast while a chunk is likely soon, then slower
            # (bounded so the delivery delay stays within a flush interval plus 150 ms).
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)
        next_after = found[-1].sequence_id if found else after
        return {
            "job_id": job_id,
            "status": job.status,
            "chunks": [chunk.public() for chunk in found],
            "next_after": next_after,
            "done": job.terminal and len(found) < limit,
        }

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> Job:
        """Idempotent: a queued job is cancelled at once, a running one at the worker's next flush."""
        job = self.get(job_id)
        if job.terminal:
            return job
        now = rfc3339(from_epoch(self._clock()))
        try:
            if job.status == "queued":
                return self._jobs.update(
                    job_id,
                    {"status": "cancelled", "cancel_requested": True, "completed_at": now},
                    condition="#status = :queued",
                    values={":queued": "queued"},
                    also=self._limiter.settlement_writes(settle(job, 0, 0, 0.0, self._clock())),
                )
            return self._jobs.update(
                job_id,
                {"cancel_requested": True},
                condition="#status = :running",
                values={":running": "running"},
            )
        except Conflict:
            return self.cancel(job_id)  # it moved on (started or finished) meanwhile: decide again


def is_terminal(status: str) -> bool:
    return status in TERMINAL


__all__ = ["Chunk", "Created", "JobService", "idempotency_hash", "is_terminal"]
