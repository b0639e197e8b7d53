"""Admission on an atomic in-memory store: the claim, the reservation and the job in one transaction;
a crash at every stage leaves either nothing or a job that will run; a write applied with its reply
lost is success; concurrent admissions admit exactly what fits."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from spool_core.errors import DependencyUnavailable, InvalidRequest
from spool_core.jobs.errors import IdempotencyKeyReused, RequestInProgress
from spool_core.jobs.model import JobRequest
from spool_core.limits.errors import TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import TenantLimits
from spool_core.limits.service import set_tenant_limits
from tests.ledger import Crash, JobWorld, running


def job(message: str = "Explain the code", **fields: Any) -> JobRequest:
    return JobRequest.model_validate({"message": message, "model": "sim-fast", "max_tokens": 200, **fields})


def test_the_idempotency_table() -> None:
    world = JobWorld()
    service = world.service("acme")
    created = service.create("key-1", job())
    assert not created.replayed
    assert created.headers["X-RateLimit-Limit-Tokens"] == "200000"
    with pytest.raises(RequestInProgress) as in_progress:
        service.create("key-1", job())
    assert in_progress.value.details == {
        "job_id": created.job.job_id,
        "status": "queued",
        "progress": {"tokens_generated": 0, "last_sequence_id": 0},
    }
    with pytest.raises(IdempotencyKeyReused):
        service.create("key-1", job("something else"))
    world.drain()
    replay = service.create("key-1", job())
    assert replay.replayed and replay.job.job_id == created.job.job_id and replay.job.status == "completed"
    assert not world.service("other").create("key-1", job()).replayed  # keys are scoped to the tenant
    assert len(world.ledger.jobs) == 2


def test_concurrent_first_requests_with_one_key_create_one_job() -> None:
    world = JobWorld()
    barrier = threading.Barrier(20)
    outcomes: list[Any] = []

    def first() -> None:
        barrier.wait()
        try:
            outcomes.append(world.service("acme").create("same", job()).job.job_id)
        except RequestInProgress as exc:
            outcomes.append(exc.details["job_id"])

    threads = [threading.Thread(target=first) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(outcomes)) == 1
    assert len(world.ledger.jobs) == len(world.ledger.messages) == running(world.ledger, "acme") == 1


def test_fifty_concurrent_admissions_admit_exactly_what_fits() -> None:
    world = JobWorld(limits=TenantLimits(1000, 1_000_000, 1000))
    barrier = threading.Barrier(50)
    admitted: list[str] = []
    refused: list[TokenLimitExceeded] = []

    def admit(i: int) -> None:
        barrier.wait()
        try:  # 56 input tokens + 14 of output: 70 reserved each
            admitted.append(world.service("burst").create(f"k{i}", job("x " * 45, max_tokens=14)).job.job_id)
        except TokenLimitExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reserved = world.ledger.jobs[("burst", admitted[0])]["usage"]["estimated_tokens"]
    assert len(admitted) == 1000 // reserved  # everything that fits, nothing more
    assert len(refused) == 50 - len(admitted)
    assert all(exc.details["tokens_remaining"] < reserved for exc in refused)
    assert running(world.ledger, "burst") == len(admitted)


@pytest.mark.parametrize(
    ("stage", "fault", "job_exists"),
    [
        ("admit", "crash", False),  # died before the transaction
        ("admit", "lost", True),  # applied, reply lost: the retry recognizes its own claim
        ("admit", "crash_after", True),  # applied, then died before sending the message
        ("send", "crash", True),  # died before sending
        ("send", "crash_after", True),  # sent, then died before answering
    ],
)
def test_a_crash_at_each_stage_of_admission_leaves_nothing_or_a_job_that_runs(
    stage: str, fault: str, job_exists: bool
) -> None:
    world = JobWorld()
    world.ledger.faults.plan[stage] = [fault]
    service = world.service("acme")
    try:
        created = service.create("key", job())
    except Crash:
        created = None
    if not job_exists:
        assert world.ledger.jobs == {} and world.ledger.claims == {} and running(world.ledger, "acme") == 0
        assert not service.create("key", job()).replayed  # the retry starts afresh
    assert len(world.ledger.jobs) == 1
    job_id = next(iter(world.ledger.jobs))[1]
    if created is not None:
        assert created.job.job_id == job_id
    world.drain()
    if world.ledger.jobs[("acme", job_id)]["status"] != "completed":  # its message never left
        world.clock.now += 121
        assert world.sweeper().sweep() == [job_id]
        world.drain()
    assert world.ledger.jobs[("acme", job_id)]["status"] == "completed"
    assert running(world.ledger, "acme") == 0
    assert [s.job_id for _, s in world.ledger.settlements] == [job_id]  # settled exactly once


def test_a_job_that_cannot_be_queued_is_withdrawn_and_its_reservation_given_back() -> None:
    world = JobWorld()
    world.ledger.faults.plan["send"] = ["fail"]
    service = world.service("acme")
    with pytest.raises(DependencyUnavailable):
        service.create("k", job())
    assert world.ledger.jobs == {} and world.ledger.claims == {} and running(world.ledger, "acme") == 0
    assert not service.create("k", job()).replayed  # the key is free again


def test_refusals_write_nothing() -> None:
    world = JobWorld(limits=TenantLimits(200_000, 10_000_000, 1))
    service = world.service("acme")
    service.create("k1", job())
    before = {k: dict(v) for k, v in world.ledger.usage["acme"].items()}
    with pytest.raises(TooManyConcurrentJobs):
        service.create("k2", job())
    assert world.ledger.usage["acme"] == before
    assert len(world.ledger.claims) == 1


def test_a_changed_limit_applies_at_the_next_admission() -> None:
    world = JobWorld()
    service = world.service("acme")
    service.create("k1", job())
    set_tenant_limits(
        world.ledger.tenant("acme"), TenantLimits(200_000, 10_000_000, 1), defaults=world.limits
    )
    with pytest.raises(TooManyConcurrentJobs):
        service.create("k2", job())


def test_the_rate_limit_headers_describe_the_tighter_bucket_as_its_429_does() -> None:
    """A tenant whose day has fewer tokens left than its minute: the headers of a 202 and of the
    day's 429 describe the day (they described the minute's full bucket beside a 429 that waited for
    the day's)."""
    world = JobWorld(
        limits=TenantLimits(tokens_per_minute=100_000, tokens_per_day=1_000, max_concurrent_jobs=16)
    )
    service = world.service("acme")
    created = service.create("first", job(max_tokens=400))
    assert created.headers["X-RateLimit-Limit-Tokens"] == "1000"
    remaining = int(created.headers["X-RateLimit-Remaining-Tokens"])
    assert 0 < remaining < 1_000 - 400
    with pytest.raises(TokenLimitExceeded) as refused:
        service.create("second", job(max_tokens=900))
    headers = refused.value.headers
    assert refused.value.details["window"] == "day" and headers["X-RateLimit-Limit-Tokens"] == "1000"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) == refused.value.details["tokens_remaining"]
    assert int(headers["X-RateLimit-Reset-Tokens"]) > 60  # the day's refill, not the minute's
    # The suggestion names the wait in seconds (it said "the number of seconds in Retry-After").
    assert refused.value.suggestions[0].startswith(f"Retry in {int(headers['Retry-After']):,} s ")
    assert refused.value.details["reset_at"] in refused.value.suggestions[0]


def test_an_empty_context_id_is_refused_by_name_and_writes_nothing() -> None:
    """A client whose context id came out empty meant a context: running without it would change the
    answer. A stored job's request that holds one still reads back (only admission refuses it)."""
    world = JobWorld()
    with pytest.raises(InvalidRequest) as refused:
        world.service("acme").create("k1", job(context_id=""))
    assert refused.value.details["param"] == "context_id"
    assert refused.value.details["fields"][0]["field"] == "context_id"
    assert not world.ledger.jobs and not world.ledger.claims
    assert job(context_id="").context_id == ""


def test_a_retry_of_a_job_accepted_before_empty_context_ids_were_refused_answers_that_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spool_core.jobs import service as jobs_service

    world = JobWorld()
    with monkeypatch.context() as before:  # the previous version admitted it
        before.setattr(jobs_service, "refuse_empty_context_id", lambda _: None)
        first = world.service("acme").create("k-old", job(context_id=""))
    with pytest.raises(RequestInProgress) as retried:  # its retry is a retry, not a new request
        world.service("acme").create("k-old", job(context_id=""))
    assert retried.value.details["job_id"] == first.job.job_id


def test_the_limits_and_the_daily_budget_are_caps_whatever_past_jobs_used() -> None:
    """A tenant whose jobs were all short: a large max_tokens is reserved whole, so it cannot run
    past the per-minute limit or the day's budget (a reservation of typical output let one job spend
    26 times the budget, and ten concurrent ones 67 times the day's tokens)."""
    world = JobWorld(limits=TenantLimits(10_000, 10**9, 5))  # 10,000 a minute
    service = world.service("acme")
    for i in range(6):  # short answers, as the tenant's usual jobs are
        service.create(f"short-{i}", job(max_tokens=5))
        world.drain()
    world.clock.now += 120  # the minute's bucket is whole again
    admitted = service.create("big", job(max_tokens=6_000))
    assert admitted.job.usage.estimated_tokens >= 6_000
    with pytest.raises(TokenLimitExceeded):
        service.create("big-2", job(max_tokens=6_000))  # 12,000 would not fit 10,000 a minute


def test_a_job_cancelled_while_queued_counts_once_in_the_usage() -> None:
    world = JobWorld()
    service = world.service("acme")
    created = service.create("k1", job())
    service.cancel(created.job.job_id)
    (row,) = world.ledger.tenant("acme").rollups("0000", "9999")
    assert (row["jobs"], row["input_tokens"], row["output_tokens"], row["cost_nanos"]) == (1, 0, 0, 0)


def test_a_429_waits_for_every_bucket_not_only_the_first_that_refused() -> None:
    """Both buckets short: Retry-After is the longer wait (the day's), so a client that obeys it is
    not refused again by the other bucket."""
    world = JobWorld(limits=TenantLimits(1_000, 1_100, 9))  # 1,000 a minute, 1,100 a day
    service = world.service("acme")
    service.create("one", job(max_tokens=590))
    with pytest.raises(TokenLimitExceeded) as refused:
        service.create("two", job(max_tokens=590))
    assert refused.value.details["window"] == "day"
    assert refused.value.retry_after_seconds > 3_600  # the day's refill, not the minute's ~36 s
    headers = refused.value.headers  # and its headers describe that bucket, as its body does
    assert headers["X-RateLimit-Limit-Tokens"] == "1100"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) == refused.value.details["tokens_remaining"]
    assert int(headers["X-RateLimit-Reset-Tokens"]) > 3_600
