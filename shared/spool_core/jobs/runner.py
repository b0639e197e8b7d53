"""The worker's logic: lease a job, stream from the provider into the chunk log, end it.

Crash safety comes from three things: a lease with expiry on the job item (taken and renewed with
conditional writes, each attempt with a token of its own), chunk puts that never overwrite, and a
resume point read from the log's last chunk, so a new attempt continues exactly where the persisted
text ends. A job that outlives one invocation hands its lease over and queues a continuation message,
so a long job never spends the delivery budget of its message.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from spool_core.chat import Message
from spool_core.circuits import Circuit, CircuitBreaker
from spool_core.clock import from_epoch, rfc3339
from spool_core.errors import SpoolError
from spool_core.jobs.cadence import Cadence
from spool_core.jobs.chunk_writer import ChunkWriter, LostLease
from spool_core.jobs.ending import error_object, first_chunk_at, job_end, model_usage, reservation_of
from spool_core.jobs.model import TERMINAL, Job, Segment
from spool_core.jobs.outcome import Outcome
from spool_core.jobs.ports import ChunkLog, Conflict, EndGuard, JobQueue, JobStore, RequestStore
from spool_core.jobs.stored import messages_of
from spool_core.jobs.watch import TICK, OutOfTime, Stalled, WatchedStream
from spool_core.limits.model import Estimate
from spool_core.limits.service import RateLimiter
from spool_core.models import ModelCatalog, ModelSpec
from spool_core.observability import logger, record_usage
from spool_core.prompt import CONTEXT_ROLE
from spool_core.providers import (
    Finished,
    GenerationRequest,
    Provider,
    ProviderError,
    ProviderMisconfigured,
    ResumePoint,
    TextDelta,
)
from spool_core.units import usd

if TYPE_CHECKING:
    from spool_core.contexts.service import ContextService  # made only for a job that names one
    from spool_core.flags import Flags


__all__ = ["JobRunner", "LostLease", "Outcome", "RunnerSettings", "build_messages"]


@dataclass(frozen=True)
class RunnerSettings:
    cadence: Cadence = field(default_factory=Cadence)
    lease_ms: int = 30_000
    max_retries: int = 3
    backoff_seconds: float = 0.2
    # Outputs up to this size are copied onto the ended job's item. 0 (the default): none is, the
    # job resource composes ``output`` from the chunk log, and the end's transaction stays small (a
    # 1,000-token output inline made it ~24 write units instead of ~6).
    inline_output_bytes: int = 0
    time_margin_ms: int = 5000
    # A provider that sends nothing for this long is a retryable error (each retry resumes from what is
    # persisted), not a read that outlives the invocation (spool_core.jobs.watch).
    stall_seconds: float = 60.0
    # A job whose every model had its circuit open waits (handed back to the queue, its slot and
    # reservation kept) until one may be probed; it fails once it has waited this long.
    circuit_wait_seconds: float = 300.0

    @property
    def visibility_seconds(self) -> int:
        """How long the job's message stays hidden from each extension: the lease and a second, so that
        after a crash it comes back once the lease has expired."""
        return self.lease_ms // 1000 + 1


class _NoCircuits:
    """A breaker store that remembers nothing (circuits off)."""

    def get_many(self, model_ids: Any) -> dict[str, Circuit]:
        return {}

    def save(self, circuit: Circuit, expected_version: int) -> bool:
        return True


# What the worker knows of a job's cancel and subscribers serves the flushes of the next 100 ms.
SIGNALS_FRESH_SECONDS = 0.1

# The longest an SQS message may be delayed (DelaySeconds): a job waiting longer for a circuit is
# picked up, finds it still open and waits again.
MAX_QUEUE_DELAY_SECONDS = 900


class Cancelled(Exception):
    pass


def build_messages(
    contexts: Callable[[], ContextService], job: Job, requests: Callable[[], RequestStore] | None = None
) -> tuple[Message, ...]:
    """The prompt: the context's files with their paths, its symbols, then the request's messages
    (from S3 when they were too large for the job item: ``requests`` makes that store). The
    context as admission counted it (``Job.context_manifest``), for every attempt; a job accepted
    before jobs recorded it reads the context's current version. ``contexts`` makes the tenant's
    context store, for a job that names a context."""
    messages = list(messages_of(job, requests))
    if job.request.context_id:
        context_id, store = job.request.context_id, contexts()
        manifest = (
            store.load_version(context_id, job.context_manifest)
            if job.context_manifest
            else store.load(context_id).manifest
        )
        messages.insert(0, Message(role=CONTEXT_ROLE, content=store.rendered(manifest)))
    return tuple(messages)


class JobRunner:
    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        contexts: Callable[[], ContextService],
        models: ModelCatalog,
        provider_for: Callable[[ModelSpec], Provider],
        limiter: RateLimiter,
        settings: RunnerSettings | None = None,
        *,
        queue: JobQueue | None = None,
        breaker: CircuitBreaker | None = None,
        flags: Flags | None = None,
        requests: Callable[[], RequestStore] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._jobs = jobs
        self._requests = requests  # where messages too large for a job item are (S3)
        self._chunks = chunks
        self._contexts = contexts
        self._models = models
        self._provider_for = provider_for
        self._limiter = limiter
        self._queue = queue
        self._breaker = breaker or CircuitBreaker(_NoCircuits())
        self._flags = flags
        self.settings = settings or RunnerSettings()
        self._clock = clock
        self._sleep = sleep

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ------------------------------------------------------------------ entry
    def run(
        self,
        job_id: str,
        *,
        heartbeat: Callable[[int], None] | None = None,
        remaining_ms: Callable[[], int] | None = None,
        continuation: int = 0,
        stalled_at: int | None = None,
        request_id: str | None = None,
        circuit_wait_since_ms: int | None = None,
    ) -> Outcome:
        """``request_id``: the invocation's, named in the error of a job it fails; ``stalled_at``: an
        invocation handed the job over after its provider stalled with nothing written, its log then
        this many tokens long (its message says so); ``circuit_wait_since_ms``: the job has waited
        for open circuits since then (its message says so)."""
        # The lease is the first request: its condition refuses a job that ended or that another
        # attempt holds, and its answer is the job (no read before it: a first token sooner).
        token = uuid.uuid4().hex
        now = self._now_ms()
        try:
            job = self._jobs.take_lease(job_id, token, now, now + self.settings.lease_ms)
        except Conflict as refused:
            return self._not_taken(job_id, refused.current)
        attempt = _Attempt(
            self,
            job,
            token,
            heartbeat,
            remaining_ms,
            continuation,
            request_id,
            stalled_at,
            circuit_wait_since_ms,
        )
        try:
            return attempt.run()
        except LostLease as lost:
            logger.warning(
                "lease lost; another attempt continues the job", extra={"job_id": job_id, "why": str(lost)}
            )
            return Outcome.RETRY

    def _not_taken(self, job_id: str, current: Mapping[str, Any] | None) -> Outcome:
        """The lease was refused: the job is gone (its message is dropped), it ended (its message is
        done), or another attempt holds it (its message waits for that lease to end)."""
        if current is None:
            logger.warning("job not found; dropping its message", extra={"job_id": job_id})
            return Outcome.DONE
        if current.get("status") in TERMINAL:
            return Outcome.DONE
        logger.info("job leased by another attempt; leaving the message", extra={"job_id": job_id})
        return Outcome.RETRY

    def fallback_enabled(self) -> bool:
        return self._flags is None or self._flags.enabled("model_fallback", default=True)


class _Attempt:
    """One invocation's work on one job, under its own lease token."""

    def __init__(
        self,
        runner: JobRunner,
        job: Job,
        token: str,
        heartbeat: Callable[[int], None] | None,
        remaining_ms: Callable[[], int] | None,
        continuation: int,
        request_id: str | None = None,
        stalled_at: int | None = None,
        circuit_wait_since_ms: int | None = None,
    ) -> None:
        self.r = runner
        self.stalled_at = stalled_at
        self.circuit_wait_since_ms = circuit_wait_since_ms
        self.probes: dict[str, int] = {}  # per model skipped for its open circuit: when it may be probed
        self.request_id = request_id
        self.job = job
        self.token = token
        self.heartbeat = heartbeat
        self.remaining_ms = remaining_ms
        self.continuation = continuation
        self.segments = list(job.segments) or [Segment(model=job.model_resolved)]
        self.input_reported = dict(job.input_reported)
        # Per model: what its finished calls in this invocation reported producing, less the tokens
        # the worker counted for their text (its tokenizer need not be the model's). Usage is what
        # the provider reported; the count stands for calls cut short (a crash, a hand-over), whose
        # report never came.
        self.output_correction: dict[str, int] = {}
        self.finish_reason: str | None = None  # the provider's, when it says why it stopped
        # Under the time margin at a flush: the job is handed over before its next token is taken
        # (an answer that ends first is ended instead: a hand-over would ask the provider again).
        self.time_up = False
        # The model whose call last sent nothing for the stall limit in this invocation, and the models
        # that did so again from the log the invocation before this one stalled on (their turn ended).
        self.stalled_model: str | None = None
        self.stalled_again_by: set[str] = set()
        self.misconfigured: dict[str, ProviderMisconfigured] = {}  # models the deployment cannot call
        self.last_beat = runner._clock()
        self.upkept_at = runner._clock()  # when the attempt last looked after its job with no flush
        self.signals_at = runner._clock()  # the lease's take read the job's cancel and subscribed
        settings = runner.settings
        self.writer = ChunkWriter(
            runner._chunks,
            job.job_id,
            runner._chunks.last(job.job_id) if job.attempts > 1 else None,  # a first attempt has no log
            writer=token,
            cadence=settings.cadence,
            clock=runner._clock,
            on_flush=self._on_flush,
            live=job.subscribed,
        )
        self.tokens_at_start = self.writer.tokens_total
        self.serving_at_start = self.segments[-1].model  # the model a stalled hand-over left serving

    # ------------------------------------------------------------------ the flow
    def run(self) -> Outcome:
        job, r = self.job, self.r
        if job.cancel_requested:  # cancelled while no worker held it (a crash): never resume it
            self._end("cancelled")
            return Outcome.DONE
        primary = r._models.get(job.model_resolved)
        if primary is None:
            self._fail(
                "model_not_found",
                f"The job's model {job.model_resolved} is no longer in the registry",
                {"model": job.model_resolved},
                ["Create a new job with a model from GET /v1/models"],
            )
            return Outcome.DONE
        try:
            messages = build_messages(r._contexts, job, r._requests)
        except SpoolError as exc:  # the context expired or vanished since admission
            self._fail(exc.code, exc.message, dict(exc.details), list(exc.suggestions))
            return Outcome.DONE
        allow_fallback = job.request.fallback and r.fallback_enabled()
        tried: list[dict[str, Any]] = []
        try:
            # model_resolved is the model serving the job: a fallback that took over goes on with it
            for model in r._models.chain(primary, fallback=allow_fallback):
                if not r._breaker.may_call(model.id):  # skipped, and not made (a secret read, maybe)
                    tried.append(self._skipped(model))
                    continue
                # Made before a probe is taken: a model the deployment cannot call takes none it would
                # never answer, and is never switched to.
                try:
                    provider = r._provider_for(model)
                except ProviderMisconfigured as exc:  # the deployment's fault, not the provider's health
                    tried.append(self._misconfigured(model, exc))
                    continue
                if not r._breaker.allow(model.id):  # another caller took the probe meanwhile
                    tried.append(self._skipped(model))
                    continue
                if model.id != self.segments[-1].model:
                    self._switch(model)
                try:
                    first_token_ms = self._stream(model, provider, messages)
                except ProviderError as exc:
                    if exc.retryable or exc.code == "provider_model_unavailable":
                        r._breaker.record_failure(model.id)  # the provider's health, never a refusal
                    tried.append({"model": model.id, "error": exc.code, "retryable": exc.retryable})
                    if not exc.retryable and exc.code != "provider_model_unavailable":
                        self._fail_refused(model, exc, tried)  # the request itself is refused
                        return Outcome.DONE
                    continue
                self._end("completed")
                # The provider's health after the job's end, not before: its reader gets `done` sooner.
                r._breaker.record_success(model.id, first_token_ms)
                return Outcome.DONE
        except Cancelled:
            self.writer.flush(notify=False)
            self._end("cancelled")
            return Outcome.DONE
        except OutOfTime:
            self.writer.flush(notify=False)
            # Said to have stalled only when the model serving it now did, and nothing was written
            stalled = (
                self.stalled_model == self.segments[-1].model
                and self.writer.tokens_total == self.tokens_at_start
            )
            return self._yield(stalled_at=self.tokens_at_start if stalled else None)
        callable_ = [entry for entry in tried if entry["model"] not in self.misconfigured]
        if callable_ and all("skipped" in entry for entry in callable_):
            # no model was called: every circuit of those the deployment can call was open
            return self._wait_for_circuits(primary, tried, allow_fallback)
        self._fail_unavailable(primary, tried, allow_fallback)
        return Outcome.DONE

    def _misconfigured(self, model: ModelSpec, exc: ProviderMisconfigured) -> dict[str, Any]:
        """The chain's entry for a model the deployment cannot call (told to the operator's log too)."""
        self.misconfigured[model.id] = exc
        logger.error(
            "a model of the job's chain cannot be called: the deployment's configuration",
            extra={"job_id": self.job.job_id, "model": model.id, "reason": str(exc)},
        )
        return {"model": model.id, "error": exc.code, "retryable": False, "message": str(exc)}

    def _skipped(self, model: ModelSpec) -> dict[str, Any]:
        """The chain's entry for a model skipped for its open circuit, with when it may be probed: when
        its cool-down or the probe under way ends (now, if another worker closed it since the skip)."""
        probe_at = self.r._breaker.probe_at_ms(model.id)
        self.probes[model.id] = self.r._now_ms() if probe_at is None else probe_at
        return {
            "model": model.id,
            "skipped": "circuit open",
            "retry_at": rfc3339(from_epoch(self.probes[model.id] / 1000)),
        }

    def _wait_for_circuits(self, primary: ModelSpec, tried: list[dict[str, Any]], fallback: bool) -> Outcome:
        """No model of the chain could be called, each skipped for its open circuit: the job is not
        failed for the providers' state at the moment it was picked up. It waits for the earliest probe,
        handed back to the queue as ``_yield`` hands it (the lease released, then a message delayed to
        that probe), so it keeps its slot and reservation. The wait counts from the first invocation
        that found every circuit open (its messages carry that time): the job fails once it has waited
        ``circuit_wait_seconds``, and a delay never passes that bound, so every wait ends; except to
        hear a probe under way answer (a few seconds: its first token, failure or time)."""
        r = self.r
        now = r._now_ms()
        since = now if self.circuit_wait_since_ms is None else self.circuit_wait_since_ms
        bound_ms = int(r.settings.circuit_wait_seconds * 1000)
        # A model skipped for another job's probe is not down: the probe says so within its few
        # seconds, and a job at its bound waits for that answer rather than fail beside it.
        probing = any(r._breaker.probe_under_way(model_id) for model_id in self.probes)
        waited_enough = now - since >= bound_ms and not probing
        if r._queue is None or waited_enough:  # no queue to wait in, or waited long enough
            self._fail_unavailable(primary, tried, fallback, waited_ms=now - since)
            return Outcome.DONE
        soonest = min(self.probes.values())
        until = soonest if probing else min(soonest, since + bound_ms)
        # Never longer than the lease: the sweeper takes a running job idle for twice the lease and a
        # minute for a forgotten one, and this job's hand-over is its last activity.
        longest = min(MAX_QUEUE_DELAY_SECONDS, max(1, r.settings.lease_ms // 1000))
        delay = min(max(math.ceil((until - now) / 1000), 1), longest)
        self._hand_over()
        r._queue.send(
            self.job.job_id,
            self.job.tenant_id,
            continuation=self.continuation,
            stalled_at=self.stalled_at,
            circuit_wait_since_ms=since,
            delay_seconds=delay,
        )
        logger.info(
            "every circuit of the job's chain is open; it waits for the earliest probe",
            extra={"job_id": self.job.job_id, "delay_seconds": delay, "waited_ms": now - since},
        )
        return Outcome.YIELD

    def _stream(self, model: ModelSpec, provider: Provider, messages: tuple[Message, ...]) -> float | None:
        """Stream one model into the log, retrying retryable errors with exponential backoff and
        jitter (each retry resumes from what is persisted); the time to its first token (ms). Raises
        the last ``ProviderError`` when the retries are spent."""
        r, job = self.r, self.job
        request = GenerationRequest(
            provider_model_id=model.provider_model_id,
            messages=messages,
            max_tokens=job.request.max_tokens,
            temperature=job.request.temperature,
            options=dict(model.options),
            metadata=dict(job.request.metadata),
        )
        calls = 0
        while True:
            calls += 1
            left = self._seconds_left()
            if self.time_up or (left is not None and left <= 0):  # no time left for a new call
                raise OutOfTime
            resume = ResumePoint(
                tokens=self.writer.tokens_total,
                text=self._persisted_text() if self._resumes_from_text(provider) else "",
                attempt=job.attempts,
            )
            started, first_token_ms = r._clock(), None
            counted_before = self.writer.tokens_received
            try:
                with WatchedStream(
                    provider.stream(request, resume),
                    stall_seconds=r.settings.stall_seconds,
                    seconds_left=left,
                    upkeep=self._upkeep_in,
                ) as events:
                    for event in events:
                        if event is TICK:
                            self._upkeep()
                        elif isinstance(event, TextDelta):
                            if self.time_up:
                                raise OutOfTime
                            if first_token_ms is None:
                                first_token_ms = (r._clock() - started) * 1000
                                r._breaker.probed(model.id)  # a probe this job made closes the circuit
                            self.writer.add(event.text, event.tokens)
                        elif isinstance(event, Finished):
                            self.input_reported[model.id] = (
                                self.input_reported.get(model.id, 0) + event.input_tokens
                            )
                            if event.output_tokens is not None:  # else the count stands
                                counted = self.writer.tokens_received - counted_before
                                self.output_correction[model.id] = (
                                    self.output_correction.get(model.id, 0) + event.output_tokens - counted
                                )
                            self.finish_reason = event.finish_reason
                self.writer.flush()
                return first_token_ms
            except ProviderError as exc:
                self.writer.flush()  # keep every token received before the failure
                stalled = isinstance(exc, Stalled)
                if stalled:
                    self.stalled_model = model.id
                # A stall of the model that stalled when the invocation before this one ran out of
                # time, from the same log: it is not waited on a third time, the next in the chain
                # takes over (or the job fails). Handed over again, the next invocation would wait the
                # same way, and the next, each a new message that never reaches the dead letters. Once
                # is handed over: a provider slow after a transient stall gets a whole invocation. A
                # model that did not stall before (a fallback) gets its retries.
                stalled_again = (
                    stalled
                    and model.id == self.serving_at_start
                    and self.stalled_at == self.writer.tokens_total
                )
                if stalled_again:
                    self.stalled_at = None
                    self.stalled_again_by.add(model.id)
                if not exc.retryable or calls > r.settings.max_retries or stalled_again:
                    exc.attempts = calls  # type: ignore[attr-defined]
                    raise
                delay = r.settings.backoff_seconds * 2 ** (calls - 1)
                logger.info(
                    "provider error; retrying", extra={"job_id": job.job_id, "code": exc.code, "delay": delay}
                )
                r._sleep(delay * (0.5 + random.random() / 2))  # jitter, not cryptography

    def _seconds_left(self) -> float | None:
        """The invocation's time before it must hand the job over (None: no limit)."""
        if self.remaining_ms is None:
            return None
        return (self.remaining_ms() - self.r.settings.time_margin_ms) / 1000

    def _resumes_from_text(self, provider: Provider) -> bool:
        """Whether the provider continues from the persisted text: it cannot continue from a token index,
        and something was persisted (nothing before an attempt's first chunk: no read of the log)."""
        return not provider.resumes_by_index and self.writer.sequence_id > 0

    def _persisted_text(self) -> str:
        return "".join(chunk.text for chunk in self.r._chunks.all(self.job.job_id))

    # ------------------------------------------------------------------ lease upkeep (at each flush)
    def _upkeep_in(self) -> float:
        """Seconds until the attempt next looks after its job while the provider sends nothing: the
        tokens waiting in the buffer written when due (DESIGN.md: every flush interval), and, with
        none waiting, the job's cancel, time and lease looked at every flush interval, as a flush
        would: a cancel lands within one flush interval (DESIGN.md), and a first token that takes
        longer than the lease no longer loses it. (A second instead, to spare a signals read, made no
        difference an A/B could see: docs/decisions.md.)"""
        due = self.writer.due_in()
        if due is not None:
            return due
        interval = self.r.settings.cadence.interval_ms(max(self.writer.sequence_id, 1)) / 1000
        return interval - (self.r._clock() - max(self.upkept_at, self.writer.last_flush_at))

    def _upkeep(self) -> None:
        if self.writer.due_in() is not None:
            self.writer.flush()  # runs the flush hook first
        else:
            self._on_flush()
        self.upkept_at = self.r._clock()

    def _on_flush(self) -> None:
        r = self.r
        now = r._clock()
        # The job's signals, unless what the worker knows is under SIGNALS_FRESH_SECONDS old (the lease
        # it just took, or the last read): a first token is written without another round trip.
        if now - self.signals_at >= SIGNALS_FRESH_SECONDS:
            signals = r._jobs.signals(self.job.job_id)
            self.signals_at = now
            if signals.cancel:
                raise Cancelled
            self.writer.live = self.writer.live or signals.subscribed
        if not self.time_up:
            left = self._seconds_left()
            self.time_up = left is not None and left < 0
        if (r._clock() - self.last_beat) * 1000 >= r.settings.lease_ms / 3:
            self._renew()

    def _renew(self) -> None:
        r = self.r
        first = self.writer.first_chunk_at if not self.job.first_token_at else None
        try:
            r._jobs.renew_lease(
                self.job.job_id, self.token, r._now_ms() + r.settings.lease_ms, self.writer.progress, first
            )
        except Conflict:
            raise LostLease("renewal refused") from None
        if first:
            self.job = self.job.model_copy(update={"first_token_at": first})
        if self.heartbeat:
            self.heartbeat(r.settings.visibility_seconds)
        self.last_beat = r._clock()

    def _switch(self, model: ModelSpec) -> None:
        """A fallback takes over: record where its output starts, so each model's tokens are priced
        at its own rates and the log says which model wrote what."""
        segment = Segment(
            model=model.id, from_sequence_id=self.writer.sequence_id + 1, from_tokens=self.writer.tokens_total
        )
        try:
            self.job = self.r._jobs.switch_model(self.job.job_id, self.token, segment, self.input_reported)
        except Conflict:
            raise LostLease("model switch refused") from None
        self.segments.append(segment)

    def _yield(self, *, stalled_at: int | None = None) -> Outcome:
        """Out of time: release the lease, then queue a continuation (if this invocation dies in
        between, its own message comes back and continues the job); ``stalled_at``: it wrote nothing
        after a stall, from a log this many tokens long."""
        r = self.r
        self._hand_over()
        if r._queue is None:
            return Outcome.RETRY
        r._queue.send(
            self.job.job_id, self.job.tenant_id, continuation=self.continuation + 1, stalled_at=stalled_at
        )
        logger.info(
            "out of time; continuing in a new invocation",
            extra={"job_id": self.job.job_id, "continuation": self.continuation + 1},
        )
        return Outcome.YIELD

    def _hand_over(self) -> None:
        """Release the lease, keeping what was written: a new invocation continues the job at once."""
        try:
            self.r._jobs.hand_over(self.job.job_id, self.token, self.writer.progress, self.input_reported)
        except Conflict:
            raise LostLease("hand-over refused") from None

    # ------------------------------------------------------------------ the end
    def _end(self, status: str, *, error: dict[str, Any] | None = None) -> None:
        r, job, writer = self.r, self.job, self.writer
        usage = model_usage(
            job.model_copy(update={"segments": self.segments}),
            writer.tokens_total,
            self.input_reported,
            r._models,
            output_correction=self.output_correction,
        )
        reservation = reservation_of(job)
        end = job_end(
            job,
            status,
            writer.progress,
            usage,
            rfc3339(from_epoch(r._clock())),
            input_reported=self.input_reported,
            segments=self.segments,
            output=self._inline_output(),
            error=error,
            first_token_at=job.first_token_at
            or writer.first_chunk_at
            or first_chunk_at(r._chunks, job.job_id),
            finish_reason=(self.finish_reason or "stop") if status == "completed" else None,
            subscribed=writer.live,
        )
        guard = EndGuard("lease", self.token)
        try:
            r._limiter.settled(job.job_id, reservation, usage, partial(r._jobs.end, job.job_id, end, guard))
        except Conflict:
            raise LostLease("end refused") from None
        for line in usage:
            record_usage(line.model_id, line.input_tokens, line.output_tokens, usd(line.cost_nanos))
        reported = sum(self.input_reported.values())
        if status == "completed" and job.estimate and reported and len(usage) == 1:
            estimate = Estimate(**{k: int(v) for k, v in job.estimate.items()})
            r._limiter.learn(usage[0].model_id, estimate, reported)
        logger.info(
            "job ended",
            extra={
                "job_id": job.job_id,
                "status": status,
                "output_tokens": end.usage.output_tokens,
                "cost_nanos": end.cost_nanos,
            },
        )

    def _inline_output(self) -> str | None:
        """The output on the job item when it is small enough (none by default); otherwise the job
        resource reads it from the chunk log."""
        limit = self.r.settings.inline_output_bytes
        if limit <= 0 or self.writer.tokens_total * 8 > limit:
            return None
        text = self._persisted_text()
        return text if len(text.encode()) <= limit else None

    def _fail(self, code: str, message: str, details: dict[str, Any], suggestions: list[str]) -> None:
        error = error_object(code, message, details, suggestions, self.writer.progress, self.request_id)
        self._end("failed", error=error)
        logger.warning("job failed", extra={"job_id": self.job.job_id, "code": code})

    def _fail_refused(self, model: ModelSpec, exc: ProviderError, tried: list[dict[str, Any]]) -> None:
        attempts = int(getattr(exc, "attempts", 1))
        self._fail(
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
        self, primary: ModelSpec, tried: list[dict[str, Any]], fallback: bool, *, waited_ms: int | None = None
    ) -> None:
        """``waited_ms``: no model was called, each skipped for its open circuit, and the job has waited
        this long for them."""
        last = tried[-1] if tried else {}
        details = {"model": primary.id, "fallback": fallback, "tried": tried, "last_error": last.get("error")}
        if fallback:
            message = f"No model in {primary.id}'s fallback chain could serve the job"
            suggestions = ["Retry later: the providers are throttling or unavailable", "Check GET /v1/health"]
        else:
            message = f"{primary.id} is unavailable and fallback is disabled for this job"
            suggestions = [
                'Retry later, or allow fallback (omit "fallback": false) to use the model\'s fallback chain',
                "Check GET /v1/health for the model's circuit and error rate",
            ]
        if self.misconfigured:  # said wherever in the chain; what only the operator can fix comes first
            message += ": " + "; ".join(str(fault) for fault in self.misconfigured.values())
            fixes = [fix for fault in self.misconfigured.values() for fix in fault.suggestions]
            if all(t["model"] in self.misconfigured for t in tried):  # no retry would help
                fallbacks = not fallback and primary.fallbacks
                suggestions = (
                    ['Allow fallback (omit "fallback": false) to use the model\'s fallback chain']
                    if fallbacks
                    else []
                )
            suggestions = list(dict.fromkeys([*fixes, *suggestions]))
        if last.get("error") == Stalled.CODE:
            stall = self.r.settings.stall_seconds
            again = last["model"] in self.stalled_again_by
            when = "in two invocations in a row" if again else "at each of its calls"
            message += f": {last['model']} sent nothing for {stall:g} s, {when}"
            details["stall_seconds"] = stall
        if waited_ms is not None:
            bound = self.r.settings.circuit_wait_seconds
            circuits = ", ".join(
                f"{t['model']} (circuit open until {t['retry_at']})" for t in tried if "retry_at" in t
            )
            chain = "the models it can call" if self.misconfigured else "its chain"
            message += (
                f": every circuit of {chain} is open, {circuits}; the job waited {waited_ms / 1000:g} s"
            )
            message += f" for them (at most {bound:g} s, SPOOL_CIRCUIT_WAIT_SECONDS)"
            details["waited_seconds"] = round(waited_ms / 1000, 3)
            details["circuit_wait_seconds"] = bound
            suggestions.insert(0, "Retry after the circuits' retry_at, when the providers are probed again")
        self._fail("model_unavailable", message, details, suggestions)
