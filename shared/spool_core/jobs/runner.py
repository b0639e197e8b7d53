"""The worker's logic: lease a job, stream from the provider into the chunk log, finish it.

Crash safety comes from three things: a lease with expiry on the job item (taken and renewed with
conditional writes), chunk puts that never overwrite, and a resume point read from the log's last
chunk, so a new attempt continues exactly where the persisted text ends.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from spool_core.chat import Message
from spool_core.circuits import Circuit, CircuitBreaker
from spool_core.clock import from_epoch, rfc3339
from spool_core.contexts.service import ContextService
from spool_core.errors import SpoolError
from spool_core.flags import Flags
from spool_core.jobs.model import Chunk, Job
from spool_core.jobs.ports import ChunkLog, Conflict, JobStore
from spool_core.limits.model import Estimate
from spool_core.limits.service import RateLimiter, settle
from spool_core.models import ModelCatalog, ModelSpec
from spool_core.observability import logger, record_usage
from spool_core.prompt import file_block, symbols_block
from spool_core.providers import Finished, GenerationRequest, Provider, ProviderError, ResumePoint, TextDelta

CONTEXT_PREAMBLE = "Answer using the following context.\n\n"


class Outcome(Enum):
    DONE = "done"  # the message can be deleted
    RETRY = "retry"  # leave the message: it returns after its visibility timeout
    YIELD = "yield"  # out of time: make the message visible again at once to continue


@dataclass(frozen=True)
class RunnerSettings:
    flush_ms: int = 200
    flush_tokens: int = 64
    lease_seconds: float = 30.0
    max_retries: int = 3
    backoff_seconds: float = 0.2
    inline_output_bytes: int = 64 * 1024  # larger outputs are read from the chunk log
    time_margin_ms: int = 5000


class _NoCircuits:
    """A breaker store that remembers nothing (circuits off)."""

    def get_many(self, model_ids: Any) -> dict[str, Circuit]:
        return {}

    def save(self, circuit: Circuit, expected_version: int) -> bool:
        return True


class LostLease(Exception):
    """Another worker owns the job now (this one stalled past its lease)."""


class Cancelled(Exception):
    pass


class OutOfTime(Exception):
    pass


class ChunkWriter:
    """Coalesces tokens into chunks: the first token at once, then every ``flush_ms`` or
    ``flush_tokens``, whichever comes first."""

    def __init__(
        self,
        log: ChunkLog,
        job_id: str,
        last: Chunk | None,
        settings: RunnerSettings,
        clock: Callable[[], float],
        on_flush: Callable[[], None],
    ) -> None:
        self._log = log
        self._job_id = job_id
        self.sequence_id = last.sequence_id if last else 0
        self.tokens_total = last.tokens_total if last else 0
        self.first_chunk_at: str | None = None
        self._settings = settings
        self._clock = clock
        self._on_flush = on_flush
        self._buffer: list[str] = []
        self._buffered_tokens = 0
        self._last_flush = clock()

    def add(self, text: str, tokens: int) -> None:
        self._buffer.append(text)
        self._buffered_tokens += tokens
        first = self.sequence_id == 0
        due = (self._clock() - self._last_flush) * 1000 >= self._settings.flush_ms
        if first or due or self._buffered_tokens >= self._settings.flush_tokens:
            self.flush()

    def flush(self, *, notify: bool = True) -> None:
        """Write the buffered tokens as the next chunk; ``notify`` runs the flush hook (cancel
        check, lease renewal) afterwards."""
        if not self._buffer:
            return
        now = self._clock()
        chunk = Chunk(
            sequence_id=self.sequence_id + 1,
            text="".join(self._buffer),
            created_at=rfc3339(from_epoch(now)),
            tokens=self._buffered_tokens,
            tokens_total=self.tokens_total + self._buffered_tokens,
        )
        try:
            self._log.append(self._job_id, chunk)
        except Conflict:
            raise LostLease(f"sequence {chunk.sequence_id} was written by another worker") from None
        self.sequence_id, self.tokens_total = chunk.sequence_id, chunk.tokens_total
        self.first_chunk_at = self.first_chunk_at or chunk.created_at
        self._buffer, self._buffered_tokens, self._last_flush = [], 0, now
        if notify:
            self._on_flush()


def build_messages(contexts: ContextService, job: Job) -> tuple[Message, ...]:
    """The prompt: the context's files with their paths, its symbols, then the request's messages."""
    messages = list(job.request.messages)
    if job.request.context_id:
        loaded = contexts.load(job.request.context_id)
        parts = [CONTEXT_PREAMBLE]
        parts += [file_block(entry.path, contexts.read_file(entry)) for entry in loaded.manifest.files]
        parts.append(symbols_block(s.model_dump() for s in loaded.manifest.symbols))
        messages.insert(0, Message(role="system", content="".join(parts)))
    return tuple(messages)


class JobRunner:
    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        contexts: ContextService,
        models: ModelCatalog,
        provider_for: Callable[[ModelSpec], Provider],
        limiter: RateLimiter,
        settings: RunnerSettings | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        flags: Flags | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        worker_id: str | None = None,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._contexts = contexts
        self._models = models
        self._provider_for = provider_for
        self._limiter = limiter
        self._breaker = breaker or CircuitBreaker(_NoCircuits())
        self._flags = flags
        self.settings = settings or RunnerSettings()
        self._clock = clock
        self._sleep = sleep
        self.worker_id = worker_id or uuid.uuid4().hex

    # ------------------------------------------------------------------ entry
    def run(
        self,
        job_id: str,
        *,
        heartbeat: Callable[[int], None] | None = None,
        remaining_ms: Callable[[], int] | None = None,
    ) -> Outcome:
        job = self._jobs.get(job_id)
        if job is None:
            logger.warning("job not found; dropping its message", extra={"job_id": job_id})
            return Outcome.DONE
        if job.terminal:
            return Outcome.DONE
        if job.cancel_requested and job.status == "queued":
            self._finish_cancelled_queued(job)
            return Outcome.DONE
        job = self._lease(job)
        if job is None:
            return self._busy(job_id)
        if heartbeat:
            # The message must stay hidden at least as long as the lease, so that after a crash it
            # comes back once the lease has expired and the next attempt can take over at once.
            heartbeat(int(self.settings.lease_seconds) + 1)
        try:
            return self._generate(job, heartbeat, remaining_ms)
        except LostLease:
            logger.warning("lease lost; another worker continues the job", extra={"job_id": job_id})
            return Outcome.RETRY

    def _lease(self, job: Job) -> Job | None:
        now = self._clock()
        try:
            return self._jobs.update(
                job.job_id,
                {
                    "status": "running",
                    "lease_owner": self.worker_id,
                    "lease_expires_at": now + self.settings.lease_seconds,
                    "attempts": job.attempts + 1,
                    "started_at": job.started_at or rfc3339(from_epoch(now)),
                },
                condition=(
                    "#status IN (:queued, :running) AND #lease_expires_at < :now AND #attempts = :attempts"
                ),
                values={":queued": "queued", ":running": "running", ":now": now, ":attempts": job.attempts},
            )
        except Conflict:
            return None

    def _busy(self, job_id: str) -> Outcome:
        current = self._jobs.get(job_id)
        if current is None or current.terminal:
            return Outcome.DONE
        logger.info("job leased by another worker; leaving the message", extra={"job_id": job_id})
        return Outcome.RETRY

    # ------------------------------------------------------------------ generation
    def _generate(
        self, job: Job, heartbeat: Callable[[int], None] | None, remaining_ms: Callable[[], int] | None
    ) -> Outcome:
        primary = self._models.get(job.model_resolved)
        if primary is None:
            raise LostLease(f"model {job.model_resolved} left the registry")  # leave it for a later attempt
        last_beat = self._clock()
        writer: ChunkWriter

        def on_flush() -> None:
            nonlocal last_beat
            if self._jobs.cancel_requested(job.job_id):
                raise Cancelled
            if remaining_ms is not None and remaining_ms() < self.settings.time_margin_ms:
                raise OutOfTime
            if self._clock() - last_beat >= self.settings.lease_seconds / 3:
                self._renew(job, writer)
                if heartbeat:
                    heartbeat(int(self.settings.lease_seconds) + 1)
                last_beat = self._clock()

        writer = ChunkWriter(
            self._chunks, job.job_id, self._chunks.last(job.job_id), self.settings, self._clock, on_flush
        )
        try:
            messages = build_messages(self._contexts, job)
        except SpoolError as exc:  # the context expired or vanished since admission
            self._fail(job, writer, exc.code, exc.message, dict(exc.details), list(exc.suggestions))
            return Outcome.DONE

        allow_fallback = job.request.fallback and self._fallback_enabled()
        chain = self._models.chain(primary, fallback=allow_fallback)
        tried: list[dict[str, Any]] = []
        model = primary
        try:
            for model in chain:
                if not self._breaker.allow(model.id):
                    tried.append({"model": model.id, "skipped": "circuit open"})
                    continue
                if model.id != job.model_resolved:
                    job = self._owned(
                        job, {"model_resolved": model.id, "fallback_used": model.id != primary.id}
                    )
                try:
                    input_tokens = self._stream(job, writer, model, messages)
                except ProviderError as exc:
                    self._breaker.record_failure(model.id)
                    tried.append({"model": model.id, "error": exc.code, "retryable": exc.retryable})
                    if not exc.retryable and exc.code != "provider_model_unavailable":
                        self._fail_provider(job, writer, model, exc, tried)  # the request itself is refused
                        return Outcome.DONE
                    continue
                self._finish(job, writer, model, input_tokens, status="completed")
                return Outcome.DONE
        except Cancelled:
            writer.flush(notify=False)
            self._finish(job, writer, model, 0, status="cancelled")
            return Outcome.DONE
        except OutOfTime:
            writer.flush(notify=False)
            self._release(job, writer)
            return Outcome.YIELD
        self._fail_unavailable(job, writer, primary, tried, allow_fallback)
        return Outcome.DONE

    def _stream(self, job: Job, writer: ChunkWriter, model: ModelSpec, messages: tuple[Message, ...]) -> int:
        """Stream one model into the log, retrying retryable errors with exponential backoff and
        jitter (each retry resumes from what is persisted); returns the input tokens the provider
        reported. Raises the last ``ProviderError`` when the retries are spent."""
        provider = self._provider_for(model)
        request = GenerationRequest(
            provider_model_id=model.provider_model_id,
            messages=messages,
            max_tokens=job.request.max_tokens,
            temperature=job.request.temperature,
            options=dict(model.options),
            metadata=dict(job.request.metadata),
        )
        input_tokens, calls = 0, 0
        while True:
            calls += 1
            resume = ResumePoint(
                tokens=writer.tokens_total,
                text="" if provider.resumes_by_index else self._persisted_text(job.job_id),
                attempt=job.attempts,
            )
            started, first_token_ms = self._clock(), None
            try:
                for event in provider.stream(request, resume):
                    if isinstance(event, TextDelta):
                        if first_token_ms is None:
                            first_token_ms = (self._clock() - started) * 1000
                        writer.add(event.text, event.tokens)
                    elif isinstance(event, Finished):
                        input_tokens += event.input_tokens
                writer.flush()
                self._breaker.record_success(model.id, first_token_ms)
                return input_tokens
            except ProviderError as exc:
                writer.flush()  # keep every token received before the failure
                if not exc.retryable or calls > self.settings.max_retries:
                    exc.attempts = calls  # type: ignore[attr-defined]
                    raise
                delay = self.settings.backoff_seconds * 2 ** (calls - 1)
                logger.info(
                    "provider error; retrying", extra={"job_id": job.job_id, "code": exc.code, "delay": delay}
                )
                self._sleep(delay * (0.5 + random.random() / 2))  # jitter, not cryptography

    def _fallback_enabled(self) -> bool:
        return self._flags is None or self._flags.enabled("model_fallback", default=True)

    def _persisted_text(self, job_id: str) -> str:
        return "".join(chunk.text for chunk in self._chunks.all(job_id))

    # ------------------------------------------------------------------ job item writes (owner only)
    def _owned(self, job: Job, changes: dict[str, Any]) -> Job:
        try:
            return self._jobs.update(
                job.job_id, changes, condition="#lease_owner = :me", values={":me": self.worker_id}
            )
        except Conflict:
            raise LostLease(job.job_id) from None

    def _progress(self, writer: ChunkWriter) -> dict[str, int]:
        return {
            "tokens_generated": writer.tokens_total,
            "last_sequence_id": writer.sequence_id,
            "chunks_written": writer.sequence_id,
        }

    def _renew(self, job: Job, writer: ChunkWriter) -> None:
        changes: dict[str, Any] = {
            "lease_expires_at": self._clock() + self.settings.lease_seconds,
            "progress": self._progress(writer),
        }
        if writer.first_chunk_at and not job.first_token_at:
            changes["first_token_at"] = writer.first_chunk_at
        self._owned(job, changes)

    def _release(self, job: Job, writer: ChunkWriter) -> None:
        self._owned(job, {"lease_expires_at": 0.0, "progress": self._progress(writer)})

    def _finish(
        self, job: Job, writer: ChunkWriter, model: ModelSpec, input_tokens: int, *, status: str
    ) -> None:
        self._end(
            job,
            model,
            {
                "status": status,
                "progress": self._progress(writer),
                "output": self._inline_output(job.job_id, writer),
                "first_token_at": job.first_token_at
                or writer.first_chunk_at
                or self._first_chunk_at(job.job_id),
                "completed_at": rfc3339(from_epoch(self._clock())),
                "lease_expires_at": 0.0,
            },
            input_reported=input_tokens,
            output_tokens=writer.tokens_total,
            learn=status == "completed",
        )

    def _end(
        self,
        job: Job,
        model: ModelSpec,
        changes: dict[str, Any],
        *,
        input_reported: int,
        output_tokens: int,
        learn: bool = False,
        condition: str = "#lease_owner = :me",
        values: dict[str, Any] | None = None,
    ) -> None:
        """The job's final write, in one transaction with the settlement of its reservation: the
        rate limiter is reconciled exactly once, however often the message is delivered."""
        input_tokens = input_reported or (self._estimated_input(job) if output_tokens else 0)
        cost = model.cost_usd(input_tokens, output_tokens)
        changes = {
            **changes,
            "usage": {
                "estimated_tokens": job.usage.estimated_tokens,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
            },
            "cost_usd": cost,
        }
        settlement = settle(job, input_tokens, output_tokens, cost, self._clock())
        try:
            self._jobs.update(
                job.job_id,
                changes,
                condition=condition,
                values=values if values is not None else {":me": self.worker_id},
                also=self._limiter.settlement_writes(settlement),
            )
        except Conflict:
            raise LostLease(job.job_id) from None
        record_usage(model.id, input_tokens, output_tokens, cost)
        if learn and job.estimate and input_reported:
            self._limiter.learn(model.id, Estimate(**job.estimate), input_reported, output_tokens)
        logger.info(
            "job ended",
            extra={
                "job_id": job.job_id,
                "status": changes.get("status"),
                "output_tokens": output_tokens,
                "cost_usd": cost,
            },
        )

    def _model_of(self, job: Job) -> ModelSpec:
        model = self._models.get(job.model_resolved)
        if model is None:
            raise LostLease(f"model {job.model_resolved} left the registry")
        return model

    @staticmethod
    def _estimated_input(job: Job) -> int:
        if job.estimate:
            return int(job.estimate["input_raw"])
        return max(0, job.usage.estimated_tokens - job.request.max_tokens)

    def _inline_output(self, job_id: str, writer: ChunkWriter) -> str | None:
        """The output on the job item when it is small; larger ones are read from the chunk log."""
        if writer.tokens_total * 8 > self.settings.inline_output_bytes:
            return None
        text = self._persisted_text(job_id)
        return text if len(text.encode()) <= self.settings.inline_output_bytes else None

    def _first_chunk_at(self, job_id: str) -> str | None:
        first = self._chunks.after(job_id, 0, 1)
        return first[0].created_at if first else None

    def _fail_provider(
        self, job: Job, writer: ChunkWriter, model: ModelSpec, exc: ProviderError, tried: list[dict[str, Any]]
    ) -> None:
        attempts = int(getattr(exc, "attempts", 1))
        self._fail(
            job,
            writer,
            exc.code,
            f"Generation failed after {attempts} attempt(s): {exc}",
            {
                "model": model.id,
                "provider": model.provider,
                "retryable": exc.retryable,
                "attempts": attempts,
                "tried": tried,
            },
            ["The provider refused the request; check the messages and parameters", "Try another model"],
        )

    def _fail_unavailable(
        self, job: Job, writer: ChunkWriter, primary: ModelSpec, tried: list[dict[str, Any]], fallback: bool
    ) -> None:
        last = tried[-1] if tried else {}
        if fallback:
            message = f"No model in {primary.id}'s fallback chain could serve the job"
            suggestions = ["Retry later: the providers are throttling or unavailable", "Check GET /v1/health"]
        else:
            message = f"{primary.id} is unavailable and fallback is disabled for this job"
            suggestions = [
                'Retry later, or allow fallback (omit "fallback": false) to use the model\'s fallback chain',
                "Check GET /v1/health for the model's circuit and error rate",
            ]
        self._fail(
            job,
            writer,
            "model_unavailable",
            message,
            {"model": primary.id, "fallback": fallback, "tried": tried, "last_error": last.get("error")},
            suggestions,
        )

    def _fail(
        self,
        job: Job,
        writer: ChunkWriter,
        code: str,
        message: str,
        details: dict[str, Any],
        suggestions: list[str],
    ) -> None:
        error = {
            "code": code,
            "message": message,
            "details": {
                **details,
                "last_sequence_id": writer.sequence_id,
                "tokens_generated": writer.tokens_total,
            },
            "suggestions": suggestions,
            "request_id": None,
        }
        model = self._model_of(job)
        self._end(
            job,
            model,
            {
                "status": "failed",
                "error": error,
                "progress": self._progress(writer),
                "completed_at": rfc3339(from_epoch(self._clock())),
                "lease_expires_at": 0.0,
            },
            input_reported=0,
            output_tokens=writer.tokens_total,
        )
        logger.warning("job failed", extra={"job_id": job.job_id, "code": code})

    def _finish_cancelled_queued(self, job: Job) -> None:
        with contextlib.suppress(LostLease):  # it started meanwhile: the running worker sees the request
            self._end(
                job,
                self._model_of(job),
                {"status": "cancelled", "completed_at": rfc3339(from_epoch(self._clock()))},
                input_reported=0,
                output_tokens=0,
                condition="#status = :queued",
                values={":queued": "queued"},
            )

    # ------------------------------------------------------------------ dead letters
    def dead_lettered(self, job_id: str) -> Outcome:
        """A message that kept failing: end its job ``failed`` unless a live worker still holds it."""
        job = self._jobs.get(job_id)
        if job is None or job.terminal:
            return Outcome.DONE
        now = self._clock()
        if job.lease_expires_at > now:
            return Outcome.RETRY  # still being generated; look again later
        last = self._chunks.last(job_id)
        progress = {
            "tokens_generated": last.tokens_total if last else 0,
            "last_sequence_id": last.sequence_id if last else 0,
            "chunks_written": last.sequence_id if last else 0,
        }
        error = {
            "code": "delivery_failed",
            "message": f"The job failed on each of its {job.attempts} attempt(s) and was dead-lettered",
            "details": {
                "attempts": job.attempts,
                "last_sequence_id": progress["last_sequence_id"],
                "tokens_generated": progress["tokens_generated"],
            },
            "suggestions": [
                "Create a new job (with a new Idempotency-Key)",
                "Report the job_id if it keeps happening",
            ],
            "request_id": None,
        }
        try:
            self._end(
                job,
                self._model_of(job),
                {
                    "status": "failed",
                    "error": error,
                    "completed_at": rfc3339(from_epoch(now)),
                    "progress": progress,
                },
                input_reported=0,
                output_tokens=progress["tokens_generated"],
                condition="#status IN (:queued, :running) AND #lease_expires_at < :now",
                values={":queued": "queued", ":running": "running", ":now": now},
            )
        except LostLease:
            return self.dead_lettered(job_id)
        return Outcome.DONE
