"""Jobs on real DynamoDB/SQS wire calls (the stack's moto): the admission transaction, the worker's
lease and log, the end with its settlement, dead letters and the sweeper's index; and every
conditional write retried after its reply was lost (applied the first time) still ends each job once."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from botocore.exceptions import ReadTimeoutError

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.circuits import CircuitBreaker
from spool_core.contexts.model import CreateContextRequest
from spool_core.errors import DependencyUnavailable, InvalidRequest
from spool_core.jobs import runner as runner_module
from spool_core.jobs.errors import ContextTooLarge, IdempotencyKeyReused, JobNotFound, RequestInProgress
from spool_core.jobs.model import MAX_SEQUENCE_ID, JobRequest
from spool_core.jobs.ports import Conflict, Signals
from spool_core.jobs.runner import JobRunner, Outcome, RunnerSettings, build_messages
from spool_core.jobs.service import JobService
from spool_core.models import ModelSpec, registry
from spool_core.providers import GenerationRequest
from spool_core.providers.simulated import SimulatedProvider, simulated_text
from spool_core.tenancy import Tenant
from tests.ledger import Crash, cadence_setting


def no_sleep(_: float) -> None:
    return None


class RecordingQueue:
    """A queue that keeps what is sent to it (the stack's queue is shared by every test)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def send(self, job_id: str, tenant_id: str, *, continuation: int = 0, **message: Any) -> None:
        self.sent.append((job_id, continuation))

    def waiting(self) -> int:
        return 0


def crash() -> None:
    raise Crash("the worker's process died")


def runner_for(
    tenant: Tenant, *, faults: bool = True, breaker: CircuitBreaker | None = None, **settings: Any
) -> JobRunner:
    """The worker's runner with instant time (no sleeps) and a crash that raises instead of exiting."""
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    config = {"lease_ms": 30_000, "backoff_seconds": 0.0, **cadence_setting(settings)}

    def provider(model: ModelSpec) -> SimulatedProvider:
        return SimulatedProvider(faults_enabled=faults, sleep=no_sleep, crash=crash)

    return JobRunner(
        jobs,
        chunks,
        partial(bootstrap.context_service, tenant),
        bootstrap.catalog(tenant),
        provider,
        bootstrap.rate_limiter(tenant),
        RunnerSettings(**config),
        queue=bootstrap.job_queue(),
        sleep=no_sleep,
        breaker=breaker,
        flags=bootstrap.feature_flags(),
        requests=partial(bootstrap.request_store, tenant),
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
    model = registry().resolve(stored.model_resolved)
    request = GenerationRequest(
        model.provider_model_id,
        build_messages(partial(bootstrap.context_service, Tenant(stored.tenant_id)), stored),
        stored.request.max_tokens,
        stored.request.temperature,
    )
    return simulated_text(request)


def log_of(service: JobService, job_id: str) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = service.chunks(job_id, after=0, limit=1000)["chunks"]
    assert [c["sequence_id"] for c in chunks] == list(range(1, len(chunks) + 1))  # contiguous from 1
    return chunks


def expire_lease(tenant: Tenant, job_id: str) -> None:
    config = bootstrap.settings()
    aws.dynamodb(config).update_item(
        TableName=config.jobs_table,
        Key={"pk": {"S": f"{tenant.id}#job#{job_id}"}},
        UpdateExpression="SET lease_expires_ms = :zero",
        ExpressionAttributeValues={":zero": {"N": "0"}},
    )


def running(tenant: Tenant) -> int:
    return int(bootstrap.rate_limiter(tenant).state()[1]["concurrent_jobs"]["running"])


# ---------------------------------------------------------------------------------------- admission
def test_the_idempotency_table_over_dynamodb(service: JobService, tenant: Tenant) -> None:
    created = service.create("key-1", job())
    assert not created.replayed and created.job.status == "queued"
    with pytest.raises(RequestInProgress) as in_progress:
        service.create("key-1", job())
    assert in_progress.value.details["job_id"] == created.job.job_id
    with pytest.raises(IdempotencyKeyReused):
        service.create("key-1", job("something else"))
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    replay = service.create("key-1", job())
    assert replay.replayed and replay.job.job_id == created.job.job_id and replay.job.status == "completed"
    assert running(tenant) == 0


def test_concurrent_first_requests_create_exactly_one_job(service: JobService) -> None:
    queue = RecordingQueue()
    service._queue = queue
    barrier = threading.Barrier(20)
    outcomes: list[Any] = []

    def first() -> None:
        barrier.wait()
        try:
            outcomes.append(service.create("same-key", job()).job.job_id)
        except RequestInProgress as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=first) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [o for o in outcomes if isinstance(o, str)]
    assert len(created) == 1
    assert all(exc.details["job_id"] == created[0] for exc in outcomes if isinstance(exc, RequestInProgress))
    assert queue.sent == [(created[0], 0)]  # and exactly one message for it


def test_a_job_that_cannot_be_queued_is_withdrawn(tenant: Tenant) -> None:
    service = bootstrap.job_service(tenant)

    class BrokenQueue:
        def send(self, job_id: str, tenant_id: str, *, continuation: int = 0, **message: Any) -> None:
            raise ConnectionError("queue down")

    service._queue = BrokenQueue()
    with pytest.raises(DependencyUnavailable):
        service.create("k", job())
    assert running(tenant) == 0
    service._queue = bootstrap.job_queue()
    assert not service.create("k", job()).replayed  # the key is free again


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
    assert any(f"PATCH /v1/contexts/{ctx['context_id']}" in s for s in too_large.value.suggestions)


def test_a_request_that_fits_the_window_as_the_model_is_sent_it_is_not_refused(
    service: JobService, tenant: Tenant
) -> None:
    """Each file counted on its own is a token above the joined text for every file ending in a
    newline (its newline and the closing tag's are one token joined): a request that fits exactly,
    as the job is billed, was refused 100 tokens over for a context of 100 files. Near the window,
    admission counts the joined text; ``tokens/count`` stays the upper bound."""
    contexts = bootstrap.context_service(tenant)
    files = [
        {"path": f"m{i}.py", "content": "value = compute(alpha, beta, gamma) + 1\n" * 48} for i in range(100)
    ]
    ctx = contexts.create(CreateContextRequest.model_validate({"files": files}))
    model = registry().resolve("sim-fast")
    probe = service.create("probe", job(context_id=ctx["context_id"], max_tokens=1, message="hi")).job
    assert runner_for(tenant).run(probe.job_id) is Outcome.DONE
    billed = service.get(probe.job_id).usage.input_tokens  # what the model is sent, counted joined
    counted = contexts.count_tokens(model, ctx["context_id"], job(message="hi").messages)["input_tokens"]
    assert counted >= billed + 100  # the upper bound, a token a file above
    room = model.context_window - billed
    fits = service.create("fits", job(context_id=ctx["context_id"], max_tokens=room, message="hi")).job
    assert fits.usage.estimated_tokens == billed + room  # the joined count, reserved
    with pytest.raises(ContextTooLarge) as over:
        service.create("over", job(context_id=ctx["context_id"], max_tokens=room + 1, message="hi"))
    assert over.value.details["tokens_over"] == 1


def test_a_request_over_the_window_is_context_too_large_whatever_else_it_exceeds(
    service: JobService, tenant: Tenant
) -> None:
    """DESIGN.md names one error for input + max_tokens over the window: it comes before the model's
    output limit (a max_tokens past both) and before the job item's size (messages too long for both)."""
    window = registry().resolve("sim-fast").context_window
    with pytest.raises(ContextTooLarge) as past_both:
        service.create("k1", job(max_tokens=window))
    assert past_both.value.details["tokens_over"] > 0
    # No context to remove: the first fix named is the max_tokens that fits (both limits).
    room = min(
        window - past_both.value.details["input_tokens"], registry().resolve("sim-fast").max_output_tokens
    )
    assert past_both.value.suggestions[0].startswith(f"Set max_tokens to at most {room:,} ")
    assert not any("context" in s and "PATCH" in s for s in past_both.value.suggestions)
    with pytest.raises(ContextTooLarge) as too_long:
        service.create("k2", job(message="word " * (window + 10), max_tokens=10))
    assert too_long.value.details["tokens_limit"] == window
    with pytest.raises(InvalidRequest):  # within the window, past the output limit
        service.create("k3", job(max_tokens=registry().resolve("sim-fast").max_output_tokens + 1))
    assert running(tenant) == 0
    # within the window, too large for a job item: its messages go to S3 (moto's here)
    big = service.create("k4", job(message="a" * 200_000, max_tokens=10)).job
    assert big.messages_blob is not None and big.request.messages == []
    assert runner_for(tenant).run(big.job_id) is Outcome.DONE
    assert service.get(big.job_id).status == "completed"


# ---------------------------------------------------------------------------------------- worker
def test_the_worker_streams_a_contiguous_log_and_settles_once(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(max_tokens=500))
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    done = service.get(created.job.job_id)
    chunks = log_of(service, done.job_id)
    assert done.status == "completed"
    output = service.view(done)["output"]
    assert "".join(c["text"] for c in chunks) == output == expected_text(service, done.job_id)
    assert done.output is None  # kept out of the job's item (the end writes a small item)
    assert len(chunks) == 1 + -(-499 // 64)
    assert done.usage.output_tokens == 500 and done.cost_nanos > 0
    assert service.view(done)["cost_usd"] == done.cost_nanos / 1e9
    assert runner_for(tenant).run(done.job_id) is Outcome.DONE  # a duplicate delivery does nothing
    usage, _ = bootstrap.rate_limiter(tenant).usage(None, None), None
    assert usage["totals"]["jobs"] == 1 and usage["totals"]["output_tokens"] == 500
    assert running(tenant) == 0


def test_a_crash_mid_stream_resumes_to_the_same_text(service: JobService, tenant: Tenant) -> None:
    faulty = service.create(
        "k", job(max_tokens=300, metadata={"simulate": {"fault": "crash", "at_token": 130}})
    )
    with pytest.raises(Crash):
        runner_for(tenant).run(faulty.job.job_id)
    assert runner_for(tenant).run(faulty.job.job_id) is Outcome.RETRY  # the lease must expire first
    expire_lease(tenant, faulty.job.job_id)
    assert runner_for(tenant).run(faulty.job.job_id) is Outcome.DONE
    done = service.get(faulty.job.job_id)
    assert (done.status, done.attempts) == ("completed", 2)
    # the first token is the first attempt's, which died before recording it on the job's item
    assert done.first_token_at == log_of(service, done.job_id)[0]["created_at"]
    assert (
        service.view(done)["output"]
        == expected_text(service, done.job_id)
        == "".join(c["text"] for c in log_of(service, done.job_id))
    )


def test_out_of_time_hands_over_and_queues_a_continuation(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(max_tokens=400))
    budget = iter([60_000] * 3 + [1_000] * 100)
    runner, queue = runner_for(tenant), RecordingQueue()
    runner._queue = queue
    assert runner.run(created.job.job_id, remaining_ms=lambda: next(budget)) is Outcome.YIELD
    part = service.get(created.job.job_id)
    assert part.status == "running" and part.lease_expires_ms == 0  # free for the next invocation
    assert queue.sent == [(created.job.job_id, 1)]
    assert runner_for(tenant).run(created.job.job_id, continuation=1) is Outcome.DONE
    ended = service.get(created.job.job_id)
    assert service.view(ended)["output"] == expected_text(service, created.job.job_id)


def test_cancel_queued_and_running(
    service: JobService, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = service.create("k1", job())
    assert service.cancel(queued.job.job_id).status == "cancelled"
    assert runner_for(tenant).run(queued.job.job_id) is Outcome.DONE
    assert service.cancel(queued.job.job_id).status == "cancelled"  # idempotent
    assert running(tenant) == 0

    started = service.create("k2", job(max_tokens=2000))
    # sim-fast flushes every few ms: read the signals at every flush (not once per 100 ms), so the
    # flush that sees the cancel is the fifth
    monkeypatch.setattr(runner_module, "SIGNALS_FRESH_SECONDS", 0.0)
    runner = runner_for(tenant, flush_tokens=16)
    original = runner._jobs.signals
    calls = {"n": 0}

    def cancel_on_fifth_flush(job_id: str) -> Signals:
        calls["n"] += 1
        if calls["n"] == 5:
            service.cancel(job_id)
        return original(job_id)

    runner._jobs.signals = cancel_on_fifth_flush  # type: ignore[method-assign]
    assert runner.run(started.job.job_id) is Outcome.DONE
    cancelled = service.get(started.job.job_id)
    assert cancelled.status == "cancelled"
    assert len(log_of(service, cancelled.job_id)) == 5  # stopped at the flush that saw the request
    assert running(tenant) == 0


def test_cancelling_a_job_whose_worker_died_ends_it_once_its_lease_ran_out(
    service: JobService, tenant: Tenant
) -> None:
    """DESIGN.md: a cancelled job ends ``cancelled`` within a flush interval. With its worker dead no
    flush comes until its message returns (12 minutes on AWS): while the dead attempt's lease is live
    the cancel is a request (a live worker would see it), once it ran out the cancel ends the job
    itself, with what was written, settled; the message's next delivery finds it ended."""
    crashed = service.create(
        "k", job(max_tokens=300, metadata={"simulate": {"fault": "crash", "at_token": 100}})
    )
    job_id = crashed.job.job_id
    with pytest.raises(Crash):
        runner_for(tenant).run(job_id)
    assert service.cancel(job_id).status == "running"  # the lease may still be a live worker's
    expire_lease(tenant, job_id)
    cancelled = service.cancel(job_id)
    written = log_of(service, job_id)
    assert cancelled.status == "cancelled" and written
    view = service.view(service.get(job_id))
    assert view["output"] == "".join(c["text"] for c in written)  # the partial output is kept
    assert view["progress"]["last_sequence_id"] == len(written)
    assert view["first_token_at"] == written[0]["created_at"]
    assert cancelled.usage.output_tokens == view["progress"]["tokens_generated"] > 0
    assert running(tenant) == 0  # its slot is given back
    assert runner_for(tenant).run(job_id) is Outcome.DONE  # the message's return does nothing
    assert len(log_of(service, job_id)) == len(written)
    assert service.cancel(job_id).status == "cancelled"  # idempotent


def test_a_cancel_racing_a_new_attempt_for_an_unheld_job_leaves_it_to_the_attempt(
    service: JobService, tenant: Tenant
) -> None:
    """The cancel read the job unheld, then an attempt took its lease before the cancel's end: the
    end's guard refuses, and the cancel becomes a request the new attempt sees at its next flush."""
    crashed = service.create(
        "k", job(max_tokens=300, metadata={"simulate": {"fault": "crash", "at_token": 100}})
    )
    job_id = crashed.job.job_id
    with pytest.raises(Crash):
        runner_for(tenant).run(job_id)
    expire_lease(tenant, job_id)
    unheld = service.get(job_id)
    config = bootstrap.settings()
    aws.dynamodb(config).update_item(  # the new attempt's lease, taken after the cancel's read
        TableName=config.jobs_table,
        Key={"pk": {"S": f"{tenant.id}#job#{job_id}"}},
        UpdateExpression="SET lease_expires_ms = :later",
        ExpressionAttributeValues={":later": {"N": str(10**15)}},
    )
    reads = iter([unheld])
    original_get = service.get
    service.get = lambda wanted: next(reads, None) or original_get(wanted)  # type: ignore[method-assign]
    assert service.cancel(job_id).status == "running"
    assert original_get(job_id).status == "running"
    jobs, _ = bootstrap._job_tables(tenant, config)
    assert jobs.signals(job_id).cancel  # what the new attempt will see


def test_a_subscribed_jobs_chunks_are_live_in_the_table(service: JobService, tenant: Tenant) -> None:
    """The mark a WebSocket subscribe leaves on the job, as DynamoDB stores it: the worker's per-flush
    read sees it and writes the next chunks with ``live`` (the chunk stream's filter in template.yaml)."""
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    alone = service.create("alone", job(max_tokens=300)).job.job_id
    watched = service.create("watched", job(max_tokens=300)).job.job_id
    assert jobs.signals(watched) == Signals(cancel=False, subscribed=False)
    assert jobs.mark_subscribed(watched).subscribed
    assert jobs.mark_subscribed(watched).subscribed  # idempotent
    assert jobs.signals(watched) == Signals(cancel=False, subscribed=True)
    for job_id in (alone, watched):
        assert runner_for(tenant, flush_tokens=16).run(job_id) is Outcome.DONE
    assert [bool(c.live) for c in chunks.all(alone)][:3] == [True, False, False]  # only the first
    assert all(c.live for c in chunks.all(watched))
    with pytest.raises(Conflict):
        jobs.mark_subscribed("job_doesnotexistdoesnotexistdoe")


def test_dead_letters_end_the_job_unless_still_leased(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job(metadata={"simulate": {"fault": "crash", "at_token": 100, "times": 9}}))
    with pytest.raises(Crash):
        runner_for(tenant).run(created.job.job_id)
    dead = bootstrap.dead_letters(tenant)
    assert dead.handle(created.job.job_id) is Outcome.RETRY
    expire_lease(tenant, created.job.job_id)
    assert dead.handle(created.job.job_id) is Outcome.DONE
    failed = service.get(created.job.job_id)
    assert (
        failed.status == "failed" and failed.error is not None and failed.error["code"] == "delivery_failed"
    )
    assert failed.error["details"]["last_sequence_id"] == len(log_of(service, failed.job_id)) > 0
    assert failed.first_token_at == log_of(service, failed.job_id)[0]["created_at"]  # it was written
    assert running(tenant) == 0


def test_a_dead_letter_keeps_its_window_and_settles_after_a_passing_failure(
    service: JobService, tenant: Tenant
) -> None:
    created = service.create("k", job(metadata={"simulate": {"fault": "crash", "at_token": 100, "times": 9}}))
    job_id = created.job.job_id
    with pytest.raises(Crash):
        runner_for(tenant).run(job_id)
    expire_lease(tenant, job_id)
    dead = bootstrap.dead_letters(tenant)
    jobs, _ = bootstrap._job_tables(tenant, bootstrap.settings())
    before = jobs._table.get("job", job_id)
    assert before is not None
    end = jobs.end
    calls: list[str] = []

    def timed_out_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(job_id)
        if len(calls) == 1:
            raise ReadTimeoutError(endpoint_url="http://dynamodb")  # after botocore's own retries
        return end(*args, **kwargs)

    dead._jobs.end = timed_out_once  # type: ignore[method-assign]
    assert dead.handle(job_id) is Outcome.RETRY
    item = jobs._table.get("job", job_id)
    assert item is not None and item["dead_lettered_ms"] == item["pending_since_ms"]
    assert item["pending_since_ms"] > before["pending_since_ms"]  # activity: the sweeper leaves it
    with pytest.raises(Crash):  # sent to a worker again (a message it still had), which died again
        runner_for(tenant).run(job_id)
    item = jobs._table.get("job", job_id)
    assert item is not None and "dead_lettered_ms" not in item  # the lease taken: a window anew
    expire_lease(tenant, job_id)
    assert dead.handle(job_id) is Outcome.DONE
    ended = service.get(job_id)
    assert ended.status == "failed"
    assert ended.usage.output_tokens == ended.progress.tokens_generated > 0  # settled with its usage
    assert running(tenant) == 0
    with pytest.raises(Conflict):
        jobs.dead_lettered_since(job_id, 10**13)  # ended: nothing more to receive


def test_the_sweeper_finds_forgotten_jobs_in_the_pending_index(tenant: Tenant) -> None:
    service = bootstrap.job_service(tenant)
    service._queue = RecordingQueue()  # accepted, never delivered
    forgotten = service.create("k", job()).job.job_id
    sweeper, queue = bootstrap.sweeper(), RecordingQueue()
    sweeper._queue = queue
    sweeper.settings = type(sweeper.settings)(queued_grace_ms=0, running_grace_ms=10**9)
    assert forgotten in sweeper.sweep()
    assert (forgotten, 0) in queue.sent
    assert runner_for(tenant).run(forgotten) is Outcome.DONE
    assert forgotten not in sweeper.sweep()  # ended: out of the index


def test_unknown_and_foreign_jobs_are_not_found(service: JobService, tenant: Tenant) -> None:
    created = service.create("k", job())
    with pytest.raises(JobNotFound):
        service.get("job_nope")
    with pytest.raises(JobNotFound):
        bootstrap.job_service(Tenant(tenant.id + "-x")).chunks(created.job.job_id)


# ---------------------------------------------------------------------------------------- lost replies
WRITES = ("PutItem", "UpdateItem", "TransactWriteItems")


def write_kind(operation: str, body: bytes) -> str:
    """Which of Spool's writes a request is: the operation, its table, and the shape of its update."""
    request = json.loads(body or b"{}")
    if operation == "TransactWriteItems":
        first = request["TransactItems"][0]
        entry = next(iter(first.values()))
        return f"{operation} {entry['TableName']} {next(iter(first))}"
    return f"{operation} {request.get('TableName')} {request.get('UpdateExpression', '')[:40]}"


@pytest.fixture
def lost_replies() -> Iterator[Callable[[str], list[str]]]:
    """The first write of each kind this process makes (an admission, a lease take, a chunk, a
    renewal, a model switch, an end...) is applied, then its reply is lost: botocore retries it, and
    the retry meets the state its own first attempt made. (Not every write: botocore's retry quota
    would rightly run out.)"""
    ddb = aws.dynamodb(bootstrap.settings())
    endpoint: Any = ddb._endpoint
    lost: list[str] = []
    kinds: set[str] = set()
    armed = {"on": False}

    def header(request: Any, name: str) -> str:
        value = request.headers.get(name, b"")
        return value.decode() if isinstance(value, bytes) else str(value)

    def send_then_lose(request: Any, **kwargs: Any) -> Any:
        operation = header(request, "X-Amz-Target").rsplit(".", 1)[-1]
        first_attempt = header(request, "amz-sdk-request").split(";")[0].strip() == "attempt=1"
        if not armed["on"] or operation not in WRITES or not first_attempt:
            return None
        kind = write_kind(operation, request.body)
        if kind in kinds:
            return None
        kinds.add(kind)
        endpoint.http_session.send(request)  # the write is applied...
        lost.append(operation)
        raise ReadTimeoutError(endpoint_url=request.url)  # ...and its reply never arrives

    ddb.meta.events.register_first("before-send.dynamodb", send_then_lose)

    def arm(_: str) -> list[str]:
        armed["on"] = True
        return lost

    yield arm
    armed["on"] = False
    ddb.meta.events.unregister("before-send.dynamodb", send_then_lose)


def test_every_conditional_write_retried_after_a_lost_reply_counts_once(
    service: JobService, tenant: Tenant, lost_replies: Callable[[str], list[str]]
) -> None:
    lost = lost_replies("on")
    created = service.create(
        "k",
        job(
            model="sim-realtime",
            max_tokens=120,
            metadata={
                "simulate": {"fault": "throttle", "at_token": 40, "times": 99, "model": "sim-realtime"}
            },
        ),
    )
    assert lost.count("TransactWriteItems") == 1  # the admission: the retry found its own claim
    runner = runner_for(tenant, max_retries=0, flush_tokens=16, lease_ms=1)  # renews at every flush
    assert runner.run(created.job.job_id) is Outcome.DONE
    done = service.get(created.job.job_id)
    assert done.status == "completed" and done.fallback_used
    assert [s.model for s in done.segments] == ["sim-realtime", "sim-fast"]  # the switch, recorded once
    assert service.view(done)["output"] == "".join(c["text"] for c in log_of(service, done.job_id))
    assert {"PutItem", "UpdateItem", "TransactWriteItems"} <= set(lost)  # chunks, lease, end: all lost once
    usage = bootstrap.rate_limiter(tenant).usage(None, None)
    assert usage["totals"]["jobs"] == 1  # settled once
    assert usage["totals"]["output_tokens"] == done.usage.output_tokens == 120
    assert running(tenant) == 0
    assert service.create(
        "k",
        job(
            model="sim-realtime",
            max_tokens=120,
            metadata={
                "simulate": {"fault": "throttle", "at_token": 40, "times": 99, "model": "sim-realtime"}
            },
        ),
    ).replayed


def test_the_queue_counts_the_messages_waiting_in_it() -> None:
    """The sweeper's backlog check, against SQS as moto serves it (a queue of this test's own)."""
    from spool_core.adapters.jobs import SqsJobQueue

    client = aws.sqs(bootstrap.settings())
    url = client.create_queue(QueueName=f"waiting-{threading.get_ident()}")["QueueUrl"]
    queue = SqsJobQueue(client, url)
    assert queue.waiting() == 0
    queue.send("job_a", "acme")
    queue.send("job_b", "acme")
    assert queue.waiting() == 2
    for message in client.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert queue.waiting() == 0
    client.delete_queue(QueueUrl=url)


def test_a_job_whose_every_circuit_is_open_waits_in_the_queue_for_the_probe(
    service: JobService, tenant: Tenant
) -> None:
    """The job is handed over on the jobs table and its message delayed on SQS (DelaySeconds, as moto
    serves it) to the circuit's probe; the delayed message carries when the wait began and runs it."""
    from spool_core.adapters.jobs import SqsJobQueue
    from spool_core.queue import JobMessage
    from tests.fakes import MemoryCircuitStore

    client = aws.sqs(bootstrap.settings())
    url = client.create_queue(QueueName=f"circuit-wait-{threading.get_ident()}")["QueueUrl"]
    try:
        shared = CircuitBreaker(MemoryCircuitStore(), threshold=1, cooldown_seconds=3)  # the real clock
        shared.record_failure("sim-fast")
        created = service.create("k", job(max_tokens=20))
        runner = runner_for(tenant, breaker=shared)
        runner._queue = SqsJobQueue(client, url)
        assert runner.run(created.job.job_id) is Outcome.YIELD
        held = service.get(created.job.job_id)
        assert held.status == "running" and held.lease_expires_ms == 0 and running(tenant) == 1
        attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert (
            attributes["ApproximateNumberOfMessagesDelayed"],
            attributes["ApproximateNumberOfMessages"],
        ) == (
            "1",
            "0",
        )
        assert SqsJobQueue(client, url).waiting() == 0  # a delayed message is no backlog for the sweeper
        received: list[Any] = []
        while not received:  # long polls until the delay has passed
            received = client.receive_message(QueueUrl=url, WaitTimeSeconds=5).get("Messages", [])
        message = JobMessage.model_validate_json(received[0]["Body"])
        assert message.job_id == created.job.job_id and message.circuit_wait_since_ms is not None
        assert (
            runner_for(tenant, breaker=shared).run(
                message.job_id, circuit_wait_since_ms=message.circuit_wait_since_ms
            )
            is Outcome.DONE
        )
        done = service.get(created.job.job_id)
        assert (done.status, done.model_resolved) == ("completed", "sim-fast") and running(tenant) == 0
        assert shared.circuit("sim-fast").state == "closed"
    finally:
        client.delete_queue(QueueUrl=url)


def test_an_end_whose_writer_missed_a_subscribe_still_writes_the_end_mark(
    service: JobService, tenant: Tenant
) -> None:
    """The worker's last look saw no subscriber; a client subscribes before the end is written: the end,
    conditional on there still being none, is refused and written again with the job's end mark."""
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    job_id = service.create("late", job(max_tokens=100)).job.job_id
    runner = runner_for(tenant, flush_tokens=16)
    original = runner._jobs.end

    def subscribed_just_before(job_id: str, *args: Any) -> Any:
        jobs.mark_subscribed(job_id)
        return original(job_id, *args)

    runner._jobs.end = subscribed_just_before  # type: ignore[method-assign]
    assert runner.run(job_id) is Outcome.DONE
    ended = service.get(job_id)
    table = aws.dynamodb(bootstrap.settings())
    marks = table.query(
        TableName=bootstrap.settings().chunks_table,
        KeyConditionExpression="pk = :pk AND sequence_id = :end",
        ExpressionAttributeValues={":pk": {"S": f"{tenant.id}#job#{job_id}"}, ":end": {"N": str(2**53)}},
    )["Items"]
    assert len(marks) == 1 and marks[0]["live"] == {"BOOL": True}
    assert marks[0]["status"] == {"S": "completed"}
    assert int(marks[0]["last_sequence_id"]["N"]) == ended.progress.last_sequence_id
    log = list(chunks.all(job_id))  # the end mark is never read as a chunk
    assert [c.sequence_id for c in log] == list(range(1, ended.progress.last_sequence_id + 1))
    assert chunks.last(job_id).sequence_id == ended.progress.last_sequence_id  # type: ignore[union-attr]
    assert len(chunks.after(job_id, 0, 1000)) == len(log)


def test_reading_after_the_largest_sequence_id_sends_no_query_with_reversed_bounds(
    service: JobService, tenant: Tenant
) -> None:
    """DynamoDB refuses a BETWEEN whose lower bound is above its upper one (moto answers it empty):
    a subscribe with the largest ``after`` must not send one."""
    _, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    job_id = service.create("at the end", job(max_tokens=20)).job.job_id
    assert runner_for(tenant).run(job_id) is Outcome.DONE
    sent: list[dict[str, Any]] = []

    def as_dynamodb_checks(params: dict[str, Any], **_: Any) -> None:
        values = params.get("ExpressionAttributeValues") or {}
        if "BETWEEN" in (params.get("KeyConditionExpression") or ""):
            sent.append(params)
            if int(values[":first"]["N"]) > int(values[":max"]["N"]):
                raise AssertionError("ValidationException: BETWEEN bounds reversed")

    events = chunks._table.client.meta.events
    events.register("provide-client-params.dynamodb.Query", as_dynamodb_checks)
    try:
        assert [c.sequence_id for c in chunks.after(job_id, 0, 100)] != []
        assert chunks.after(job_id, MAX_SEQUENCE_ID, 100) == []
        assert chunks.after(job_id, MAX_SEQUENCE_ID - 1, 100) == []
    finally:
        events.unregister("provide-client-params.dynamodb.Query", as_dynamodb_checks)
    assert len(sent) == 2  # from 0 and from the largest but one; none from the largest


def test_every_end_leaves_an_end_mark_after_the_last_chunk(service: JobService, tenant: Tenant) -> None:
    """A reader learns that a job ended from the read that brings its last chunks: the end mark."""
    _, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    job_id = service.create("marked", job(max_tokens=200)).job.job_id
    assert chunks.page(job_id, 0, 10).end is None  # queued: nothing yet
    assert runner_for(tenant, flush_tokens=16).run(job_id) is Outcome.DONE
    last = service.get(job_id).progress.last_sequence_id
    whole = chunks.page(job_id, 0, 1000, consistent=False)
    assert [c.sequence_id for c in whole.chunks] == list(range(1, last + 1))
    assert whole.end is not None and (whole.end.status, whole.end.last_sequence_id) == ("completed", last)
    assert chunks.page(job_id, 0, 2).end is None  # more than a page remains
    tail = chunks.page(job_id, last - 1, 1)
    assert [c.sequence_id for c in tail.chunks] == [last] and tail.end is not None
    page = service.chunks(job_id, after=last - 1, limit=1)
    assert (page["done"], page["status"], page["next_after"]) == (True, "completed", last)
