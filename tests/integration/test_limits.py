"""Token-aware limits on real DynamoDB conditional writes: exact admission under concurrency,
refill, settlement exactly once, learning, usage totals."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.jobs.model import JobRequest
from spool_core.jobs.runner import Outcome
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import Estimate, TenantLimits
from spool_core.limits.service import RateLimiter
from spool_core.tenancy import Tenant
from tests.integration.test_jobs import runner_for


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def limiter(tenant: str, clock: Clock, **limits: Any) -> RateLimiter:
    settings = {"tokens_per_minute": 1000, "tokens_per_day": 1_000_000, "max_concurrent_jobs": 1000, **limits}
    return RateLimiter(bootstrap.usage_store(Tenant(tenant)), TenantLimits(**settings), clock=clock)


def test_fifty_concurrent_admissions_admit_exactly_what_fits(stack: StackDescription) -> None:
    clock = Clock()
    bucket = limiter("burst", clock)
    barrier = threading.Barrier(50)
    admitted: list[int] = []
    refused: list[TokenLimitExceeded] = []

    def admit() -> None:
        barrier.wait()
        try:
            admitted.append(bucket.reserve(70, 0.0).tokens)
        except TokenLimitExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=admit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) <= 1000
    assert len(admitted) == 1000 // 70  # 14: everything that fits, nothing more
    assert len(refused) == 36
    assert all(exc.details["tokens_remaining"] < 70 for exc in refused)
    assert bucket.headers()["X-RateLimit-Remaining-Tokens"] == str(1000 - 14 * 70)


def test_the_bucket_refills_over_time(stack: StackDescription) -> None:
    clock = Clock()
    bucket = limiter("refill", clock)
    bucket.reserve(1000, 0.0)
    with pytest.raises(TokenLimitExceeded) as empty:
        bucket.reserve(100, 0.0)
    assert empty.value.details["reset_at"] == "2027-01-15T08:00:06.000Z"  # 100 tokens refill in 6 s
    assert empty.value.headers["Retry-After"] == "6"
    clock.now += 6
    bucket.reserve(100, 0.0)
    clock.now += 60
    assert bucket.headers() == {
        "X-RateLimit-Limit-Tokens": "1000",
        "X-RateLimit-Remaining-Tokens": "1000",
        "X-RateLimit-Reset-Tokens": "0",
    }


def test_a_refused_admission_holds_nothing(stack: StackDescription) -> None:
    clock = Clock()
    bucket = limiter("rollback", clock, tokens_per_day=500, max_concurrent_jobs=1)
    with pytest.raises(TokenLimitExceeded) as per_day:
        bucket.reserve(600, 0.0)  # fits the minute bucket, not the day one
    assert per_day.value.details["window"] == "day"
    assert bucket.headers()["X-RateLimit-Remaining-Tokens"] == "1000"  # the minute tokens were given back
    held = bucket.reserve(400, 0.0)
    with pytest.raises(TooManyConcurrentJobs) as busy:
        bucket.reserve(10, 0.0)
    assert busy.value.details == {"running": 1, "limit": 1}
    bucket.cancel(held)
    bucket.reserve(400, 0.0)


def test_the_daily_budget(stack: StackDescription) -> None:
    clock = Clock()
    bucket = limiter("budget", clock, daily_budget_usd=1.0)
    bucket.reserve(10, 0.6)
    with pytest.raises(BudgetExceeded) as over:
        bucket.reserve(10, 0.5)
    assert over.value.details == {
        "budget_usd": 1.0,
        "spent_usd": 0.6,
        "estimated_cost_usd": 0.5,
        "reset_at": "2027-01-16T00:00:00.000Z",
    }
    assert bucket.state()["daily_budget"]["committed_usd"] == 0.6
    with pytest.raises(BudgetExceeded):
        limiter("budget-2", clock, daily_budget_usd=1.0).reserve(10, 2.0)  # alone above the budget


def test_the_correction_factor_follows_the_observed_ratio_within_bounds(stack: StackDescription) -> None:
    learner = limiter("learn", Clock())
    estimate = Estimate(input_raw=1000, correction=1.0, input_tokens=1000, output_tokens=100)
    for _ in range(30):
        learner.learn("sim-fast", estimate, input_tokens=3000, output_tokens=100)  # 3x more than estimated
    assert learner.estimate("sim-fast", 1000, 500).correction == 2.0  # bounded
    for _ in range(3):
        learner.learn("sim-fast", estimate, input_tokens=800, output_tokens=100)
    moved = learner.estimate("sim-fast", 1000, 500)
    assert 0.8 < moved.correction < 2.0
    assert moved.input_tokens == pytest.approx(1000 * moved.correction, abs=1)
    assert moved.output_tokens == 256  # recent outputs were 100: reserve the floor, not max_tokens


def run_job(tenant: Tenant, key: str, **fields: Any) -> Any:
    service = bootstrap.job_service(tenant)
    request = JobRequest.model_validate(
        {"message": "usage", "model": "sim-fast", "max_tokens": 300, **fields}
    )
    created = service.create(key, request)
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    return service.get(created.job.job_id)


def test_settlement_happens_once_and_totals_equal_the_jobs(stack: StackDescription) -> None:
    tenant = Tenant("ledger")
    jobs = [run_job(tenant, f"k{i}", max_tokens=100 + 50 * i) for i in range(3)]
    runner = runner_for(tenant)
    assert runner.run(jobs[0].job_id) is Outcome.DONE  # the duplicated completion message
    assert runner.dead_lettered(jobs[0].job_id) is Outcome.DONE
    state = bootstrap.rate_limiter(tenant)
    usage = state.usage(None, None)
    totals = usage["totals"]
    assert totals["jobs"] == 3
    assert totals["input_tokens"] == sum(j.usage.input_tokens for j in jobs)
    assert totals["output_tokens"] == sum(j.usage.output_tokens for j in jobs) == 100 + 150 + 200
    assert totals["cost_usd"] == pytest.approx(sum(j.cost_usd for j in jobs))
    assert usage["by_model"]["sim-fast"]["jobs"] == 3
    assert usage["limits"]["concurrent_jobs"]["running"] == 0  # every slot released, once
    used = sum(j.usage.input_tokens + j.usage.output_tokens for j in jobs)
    remaining = int(state.headers()["X-RateLimit-Remaining-Tokens"])
    assert remaining >= state.limits.tokens_per_minute - used  # actual usage charged, not the reservation


def test_a_cancelled_queued_job_is_refunded(stack: StackDescription) -> None:
    tenant = Tenant("refund")
    service = bootstrap.job_service(tenant)
    created = service.create(
        "k", JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 5000})
    )
    limits = bootstrap.rate_limiter(tenant)
    assert int(limits.headers()["X-RateLimit-Remaining-Tokens"]) < 200_000 - 4000  # (refill: 3,333/s)
    service.cancel(created.job.job_id)
    assert limits.headers()["X-RateLimit-Remaining-Tokens"] == "200000"
    assert limits.state()["concurrent_jobs"]["running"] == 0
