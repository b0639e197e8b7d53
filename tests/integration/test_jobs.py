"""Jobs logic on real DynamoDB/SQS wire calls (moto): idempotency, admission, the worker, the log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.circuits import CircuitBreaker
from spool_core.contexts.model import CreateContextRequest
from spool_core.errors import DependencyUnavailable
from spool_core.jobs.errors import (
    ContextTooLarge,
    IdempotencyKeyRequired,
    IdempotencyKeyReused,
    JobNotFound,
    RequestInProgress,
)
from spool_core.jobs.model import JobRequest
from spool_core.jobs.runner import JobRunner, Outcome, RunnerSettings
from spool_core.jobs.service import JobService
from spool_core.models import ModelSpec, registry
from spool_core.providers import GenerationRequest
from spool_core.providers.simulated import SimulatedProvider, simulated_text
from spool_core.tenancy import Tenant
from tests.integration.conftest import client


class Crash(BaseException):
    """Stands in for the process dying: nothing in the runner catches a BaseException."""


def no_sleep(_: float) -> None:
    return None


def crash() -> None:
    raise Crash


def runner_for(
    tenant: Tenant, *, faults: bool = True, breaker: CircuitBreaker | None = None, **settings: Any
) -> JobRunner:
    """The worker's runner with instant time (no sleeps) and a crash that raises instead of exiting."""
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    config = {"flush_ms": 200, "flush_tokens": 64, "lease_seconds": 30.0, "backoff_seconds": 0.0, **settings}

    def provider(model: ModelSpec) -> SimulatedProvider:
        return SimulatedProvider(faults_enabled=faults, sleep=no_sleep, crash=crash)

    return JobRunner(
        jobs,
        chunks,
        bootstrap.context_service(tenant),
        bootstrap.catalog(tenant),
        provider,
        bootstrap.rate_limiter(tenant),
        RunnerSettings(**config),
        sleep=no_sleep,
        breaker=breaker,
        flags=bootstrap.feature_flags(),
    )


@pytest.fixture
def tenant(request: pytest.FixtureRequest, stack: StackDescription) -> Tenant:
    return Tenant("t-" + request.node.name[-40:].replace("[", "-").replace("]", "").replace("_", "-"))


@pytest.fixture
def service(tenant: Tenant) -> JobService:
    return bootstrap.job_service(tenant)


def job(message: str = "Explain the code", **fields: Any) -> JobRequest:
    return JobRequest.model_validate({"message": message, "model": "sim-fast", "max_tokens": 200, **fields})


def expected_text(service: JobService, job_id: str) -> str:
    stored = service.get(job_id)
    from spool_core.jobs.runner import build_messages

    model = registry().resolve(stored.model_resolved)
    request = GenerationRequest(
        model.provider_model_id,
        build_messages(bootstrap.context_service(Tenant(stored.tenant_id)), stored),
        stored.request.max_tokens,
        stored.request.temperature,
    )
    return simulated_text(request)


def log_of(service: JobService, job_id: str) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = service.chunks(job_id, after=0, limit=1000)["chunks"]
    assert [c["sequence_id"] for c in chunks] == list(range(1, len(chunks) + 1))  # contiguous from 1
    return chunks


# ---------------------------------------------------------------------------------------- idempotency
def test_idempotency_table(service: JobService, tenant: Tenant) -> None:
    with pytest.raises(IdempotencyKeyRequired):
        service.create(None, job())
    created = service.create("key-1", job())
    assert not created.replayed
    assert created.job.status == "queued"
    with pytest.raises(RequestInProgress) as in_progress:
        service.create("key-1", job())
    assert in_progress.value.details == {
        "job_id": created.job.job_id,
        "status": "queued",
        "progress": {"tokens_generated": 0, "last_sequence_id": 0},
    }
    with pytest.raises(IdempotencyKeyReused):
        service.create("key-1", job("something else"))
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    replay = service.create("key-1", job())
    assert replay.replayed
    assert replay.job.job_id == created.job.job_id
    assert replay.job.status == "completed"
    other_tenant = bootstrap.job_service(Tenant(tenant.id + "-b"))
    assert not other_tenant.create("key-1", job()).replayed  # keys are scoped to the tenant


def test_message_and_messages_are_the_same_request() -> None:
    short = job("hi")
    long = JobRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "model": "sim-fast", "max_tokens": 200}
    )
    assert short.fingerprint() == long.fingerprint()
    assert job("hi", metadata={"a": 1}).fingerprint() != short.fingerprint()
    with pytest.raises(ValueError, match="messages"):
        JobRequest.model_validate({"model": "sim-fast"})


def test_concurrent_first_requests_create_exactly_one_job(
    service: JobService, stack: StackDescription
) -> None:
    barrier = threading.Barrier(20)
    outcomes: list[Any] = []

    def first_request() -> None:
        barrier.wait()
        try:
            outcomes.append(service.create("same-key", job()).job.job_id)
        except RequestInProgress as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=first_request) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [o for o in outcomes if isinstance(o, str)]
    assert len(created) == 1
    assert all(exc.details["job_id"] == created[0] for exc in outcomes if isinstance(exc, RequestInProgress))
    sqs = client("sqs", stack)
    messages = sqs.receive_message(
        QueueUrl=stack.refs["JobsQueue"], MaxNumberOfMessages=10, VisibilityTimeout=0
    )
    sent = [m for m in messages.get("Messages", []) if created[0] in m["Body"]]
    assert len(sent) == 1  # and exactly one message for it


def test_a_job_that_cannot_be_queued_is_undone(tenant: Tenant) -> None:
    service = bootstrap.job_service(tenant)

    class BrokenQueue:
        def send(self, job_id: str, tenant_id: str) -> None:
            raise ConnectionError("queue down")

    service._queue = BrokenQueue()
    with pytest.raises(DependencyUnavailable):
        service.create("k", job())
    service._queue = bootstrap.job_service(tenant)._queue
    assert not service.create("k", job()).replayed  # the key is free again


# ---------------------------------------------------------------------------------------- admission
def test_admission_counts_context_and_messages_against_the_window(
    service: JobService, tenant: Tenant
) -> None:
    contexts = bootstrap.context_service(tenant)
    ctx = contexts.create(
        CreateContextRequest.model_validate({"files": [{"path": "a.py", "content": "x = 1\n" * 50}]})
    )
    created = service.create("k1", job(context_id=ctx["context_id"], max_tokens=100))
    assert created.job.usage.estimated_tokens > 100 + ctx["token_count"]
    with pytest.raises(ContextTooLarge) as too_large:
        service.create("k2", job(context_id=ctx["context_id"], max_tokens=65_536, message="x " * 70_000))
    details = too_large.value.details
    assert details["tokens_over"] == details["tokens_requested"] - details["tokens_limit"] > 0
    assert details["tokens_limit"] == 128_000
    assert too_large.value.suggestions


# ---------------------------------------------------------------------------------------- worker
def test_worker_streams_a_contiguous_log_equal_to_the_output(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(max_tokens=500))
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    done = service.get(created.job.job_id)
    chunks = log_of(service, done.job_id)
    assert done.status == "completed"
    assert "".join(c["text"] for c in chunks) == done.output == expected_text(service, done.job_id)
    assert chunks[0]["text"] == expected_text(service, done.job_id)[: len(chunks[0]["text"])]
    assert len(chunks) == 1 + -(-499 // 64)  # the first token alone, then 64-token chunks at full speed
    assert done.usage.output_tokens == 500
    assert done.cost_usd > 0
    assert done.started_at and done.first_token_at and done.completed_at
    view = service.view(done)
    assert view["progress"] == {
        "tokens_generated": 500,
        "last_sequence_id": len(chunks),
        "chunks_written": len(chunks),
    }
    page = service.chunks(done.job_id, after=3, limit=2)
    assert [c["sequence_id"] for c in page["chunks"]] == [4, 5]
    assert (page["next_after"], page["done"]) == (5, False)
    tail = service.chunks(done.job_id, after=len(chunks) - 1)
    assert (tail["next_after"], tail["done"]) == (len(chunks), True)
    assert "".join(c["text"] for c in chunk_iter(service, done.job_id)) == done.output  # paging by 3
    assert runner_for(tenant).run(done.job_id) is Outcome.DONE  # a duplicate delivery does nothing
    assert len(log_of(service, done.job_id)) == len(chunks)


def test_a_crash_mid_stream_resumes_to_the_same_text(service: JobService, tenant: Tenant) -> None:
    faulty = service.create(
        "k", job(max_tokens=300, metadata={"simulate": {"fault": "crash", "at_token": 130}})
    )
    with pytest.raises(Crash):
        runner_for(tenant).run(faulty.job.job_id)
    stuck = service.get(faulty.job.job_id)
    assert stuck.status == "running"
    persisted = log_of(service, stuck.job_id)
    assert sum(len(c["text"]) for c in persisted) > 0
    # The lease must expire before another worker may continue.
    assert runner_for(tenant).run(stuck.job_id) is Outcome.RETRY
    bootstrap._job_tables(tenant, bootstrap.settings())[0].update(stuck.job_id, {"lease_expires_at": 0.0})
    assert runner_for(tenant).run(stuck.job_id) is Outcome.DONE
    done = service.get(stuck.job_id)
    assert done.status == "completed"
    assert done.attempts == 2
    assert done.output == expected_text(service, done.job_id)
    assert "".join(c["text"] for c in log_of(service, done.job_id)) == done.output
    clean = service.create("k2", job(max_tokens=300, metadata={}))
    runner_for(tenant).run(clean.job.job_id)
    assert service.get(clean.job.job_id).output == done.output  # metadata never changes the text


def test_retryable_errors_are_retried_and_resume(service: JobService, tenant: Tenant) -> None:
    created = service.create(
        "k", job(metadata={"simulate": {"fault": "throttle", "at_token": 50, "times": 2}})
    )
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    done = service.get(created.job.job_id)
    assert done.status == "completed"
    assert done.output == expected_text(service, done.job_id)


def test_exhausted_retries_and_fatal_errors_fail_with_partial_output(
    service: JobService, tenant: Tenant
) -> None:
    throttled = service.create(
        "k1", job(metadata={"simulate": {"fault": "server_error", "at_token": 10, "times": 9}})
    )
    runner_for(tenant, max_retries=2).run(throttled.job.job_id)
    failed = service.get(throttled.job.job_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "model_unavailable"  # sim-fast has no fallback to turn to
    assert failed.error["details"]["tried"] == [
        {"model": "sim-fast", "error": "provider_unavailable", "retryable": True}
    ]

    fatal = service.create("k2", job(metadata={"simulate": {"fault": "fatal", "at_token": 100}}))
    runner_for(tenant).run(fatal.job.job_id)
    failed = service.get(fatal.job.job_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "provider_error"
    assert failed.error["suggestions"]
    partial = "".join(c["text"] for c in log_of(service, failed.job_id))
    assert failed.error["details"]["last_sequence_id"] == len(log_of(service, failed.job_id))
    assert failed.error["details"]["tokens_generated"] == 100
    assert service.view(failed)["output"] == partial == expected_text(service, failed.job_id)[: len(partial)]


def test_faults_are_ignored_unless_enabled(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(metadata={"simulate": {"fault": "fatal", "at_token": 1}}))
    runner_for(tenant, faults=False).run(created.job.job_id)
    assert service.get(created.job.job_id).status == "completed"


def test_cancel(service: JobService, tenant: Tenant) -> None:
    queued = service.create("k1", job())
    assert service.cancel(queued.job.job_id).status == "cancelled"
    assert runner_for(tenant).run(queued.job.job_id) is Outcome.DONE
    assert service.cancel(queued.job.job_id).status == "cancelled"  # idempotent

    running = service.create("k2", job(max_tokens=2000))
    runner = runner_for(tenant, flush_tokens=16)
    original_flush = runner._jobs.cancel_requested
    calls = {"n": 0}

    def cancel_on_fifth_flush(job_id: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            service.cancel(job_id)
        return original_flush(job_id)

    runner._jobs.cancel_requested = cancel_on_fifth_flush  # type: ignore[method-assign]
    assert runner.run(running.job.job_id) is Outcome.DONE
    cancelled = service.get(running.job.job_id)
    assert cancelled.status == "cancelled"
    chunks = log_of(service, cancelled.job_id)
    assert len(chunks) == 5  # stopped at the flush that saw the request
    assert service.view(cancelled)["output"] == "".join(c["text"] for c in chunks)


def test_out_of_time_yields_and_a_new_invocation_continues(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(max_tokens=400))
    budget = iter([60_000] * 3 + [1_000] * 100)
    assert runner_for(tenant).run(created.job.job_id, remaining_ms=lambda: next(budget)) is Outcome.YIELD
    part = service.get(created.job.job_id)
    assert part.status == "running"
    assert part.lease_expires_at == 0.0  # released for the next invocation
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    assert service.get(created.job.job_id).output == expected_text(service, created.job.job_id)


def test_expired_context_at_run_time_fails_the_job(service: JobService, tenant: Tenant) -> None:
    contexts = bootstrap.context_service(tenant)
    ctx = contexts.create(
        CreateContextRequest.model_validate({"files": [{"path": "a", "content": "b"}], "ttl_seconds": 1})
    )
    created = service.create("k", job(context_id=ctx["context_id"]))
    import time

    time.sleep(1.05)
    runner_for(tenant).run(created.job.job_id)
    failed = service.get(created.job.job_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "context_expired"


def test_dead_lettered_jobs_end_failed_unless_still_leased(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(metadata={"simulate": {"fault": "crash", "at_token": 100, "times": 9}}))
    with pytest.raises(Crash):
        runner_for(tenant).run(created.job.job_id)
    runner = runner_for(tenant)
    assert runner.dead_lettered(created.job.job_id) is Outcome.RETRY  # its lease is alive
    bootstrap._job_tables(tenant, bootstrap.settings())[0].update(
        created.job.job_id, {"lease_expires_at": 0.0}
    )
    assert runner.dead_lettered(created.job.job_id) is Outcome.DONE
    failed = service.get(created.job.job_id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "delivery_failed"
    assert failed.error["details"]["last_sequence_id"] == len(log_of(service, failed.job_id)) > 0
    assert runner.dead_lettered("job_missing") is Outcome.DONE


def test_unknown_and_foreign_jobs_are_not_found(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job())
    with pytest.raises(JobNotFound):
        service.get("job_nope")
    with pytest.raises(JobNotFound):
        bootstrap.job_service(Tenant(tenant.id + "-x")).chunks(created.job.job_id)


def test_long_poll_returns_when_a_chunk_arrives(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(max_tokens=100))
    timer = threading.Timer(0.3, lambda: runner_for(tenant).run(created.job.job_id))
    timer.start()
    page = service.chunks(created.job.job_id, after=0, wait=5)
    timer.join()
    assert page["chunks"]
    assert page["chunks"][0]["sequence_id"] == 1


def chunk_iter(service: JobService, job_id: str) -> Iterator[dict[str, Any]]:
    after = 0
    while True:
        page = service.chunks(job_id, after=after, limit=3)
        yield from page["chunks"]
        after = page["next_after"]
        if page["done"]:
            return
