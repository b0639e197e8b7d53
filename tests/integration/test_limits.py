"""Token-aware limits on real DynamoDB (the stack's moto): exact admission under concurrency, refill on
an injected clock, refusals that write nothing, settlement exactly once, usage totals."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.clock import from_epoch, rfc3339
from spool_core.errors import DependencyUnavailable
from spool_core.jobs.ending import reservation_of
from spool_core.jobs.model import Job, JobRequest, Progress, Usage
from spool_core.jobs.ports import EndGuard, JobEnd
from spool_core.jobs.runner import Outcome
from spool_core.jobs.service import JobService
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import ModelUsage, Settlement, TenantLimits
from spool_core.limits.service import RateLimiter, set_tenant_limits
from spool_core.tenancy import Tenant
from tests.integration.conftest import client
from tests.integration.test_jobs import runner_for
from tests.ledger import Clock


def service(tenant: str, clock: Clock | None = None, **limits: Any) -> JobService:
    """The jobs API of one tenant on DynamoDB, with its own limits and, optionally, its own clock."""
    settings = {"tokens_per_minute": 1000, "tokens_per_day": 1_000_000, "max_concurrent_jobs": 1000, **limits}
    built = bootstrap.job_service(Tenant(tenant))
    store = bootstrap.usage_store(Tenant(tenant))
    if clock is None:
        built._limiter = RateLimiter(store, TenantLimits(**settings))
    else:
        built._limiter = RateLimiter(store, TenantLimits(**settings), clock_ms=clock.ms)
        built._clock = clock
    return built


def before_the_first(target: Any, method: str, meanwhile: Callable[[], None]) -> list[str]:
    """Run ``meanwhile`` before the first call of ``target.method`` (what lands between a read and
    its write); the calls made, one entry each."""
    real = getattr(target, method)
    calls: list[str] = []

    def call(*args: Any) -> Any:
        calls.append(method)
        if len(calls) == 1:
            meanwhile()
        return real(*args)

    setattr(target, method, call)
    return calls


def job(tokens: int = 14, message: str = "x " * 45) -> JobRequest:
    """56 input tokens + ``tokens`` of output reserved."""
    return JobRequest.model_validate({"message": message, "model": "sim-fast", "max_tokens": tokens})


def defaults() -> TenantLimits:
    """The deployment's default limits, as admission reads them."""
    return bootstrap.default_limits(bootstrap.settings())


def test_fifty_concurrent_admissions_admit_exactly_what_fits(stack: StackDescription) -> None:
    jobs = service("burst", Clock())  # time stands still: nothing refills during the burst
    barrier = threading.Barrier(50)
    admitted: list[int] = []
    refused: list[TokenLimitExceeded] = []

    def admit(i: int) -> None:
        barrier.wait()
        try:
            admitted.append(jobs.create(f"k{i}", job()).job.usage.estimated_tokens)
        except TokenLimitExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 1000 // admitted[0]  # everything that fits, nothing more
    assert len(refused) == 50 - len(admitted)
    assert all(exc.details["tokens_remaining"] < admitted[0] for exc in refused)
    state, limits = jobs._limiter.state()
    assert limits["tokens_per_minute"]["remaining"] == 1000 - sum(admitted)
    assert state.running == len(admitted)


def test_the_bucket_refills_over_time(stack: StackDescription) -> None:
    clock = Clock(now=1_800_000_000.0)
    jobs = service("refill", clock)
    first = jobs.create("k1", job(tokens=900)).job.usage.estimated_tokens
    second = job(tokens=100)
    with pytest.raises(TokenLimitExceeded) as empty:
        jobs.create("k2", second)
    missing = empty.value.details["tokens_requested"] - (1000 - first)
    assert empty.value.details["tokens_remaining"] == 1000 - first
    wait_us = -(-missing * 60_000_000 // 1000)  # each token refills in 60 ms
    assert empty.value.details["reset_at"] == rfc3339(from_epoch(clock.now + wait_us / 1e6))
    assert empty.value.headers["Retry-After"] == str(-(-wait_us // 1_000_000))
    clock.now += wait_us / 1e6
    jobs.create("k2", second)  # it fits exactly now
    clock.now += 60
    assert jobs._limiter.state()[1]["tokens_per_minute"]["remaining"] == 1000


def test_a_refused_admission_holds_nothing(stack: StackDescription) -> None:
    jobs = service("rollback", tokens_per_day=500, max_concurrent_jobs=1)
    with pytest.raises(TokenLimitExceeded) as per_day:
        jobs.create("k1", job(tokens=544))  # fits the minute bucket, not the day one
    assert per_day.value.details["window"] == "day"
    assert jobs._limiter.state()[1]["tokens_per_minute"]["remaining"] == 1000  # nothing was taken
    held = jobs.create("k2", job(tokens=344))
    with pytest.raises(TooManyConcurrentJobs) as busy:
        jobs.create("k3", job(tokens=1))
    assert busy.value.details == {"running": 1, "limit": 1}
    jobs.cancel(held.job.job_id)
    jobs.create("k4", job(tokens=344))


def test_the_daily_budget(stack: StackDescription) -> None:
    jobs = service("budget", daily_budget_nanos=30_000)  # $0.00003; a job below costs ~$0.0000116
    jobs.create("k1", job(tokens=14))
    jobs.create("k2", job(tokens=14))
    with pytest.raises(BudgetExceeded) as over:
        jobs.create("k3", job(tokens=14))
    assert over.value.details["budget_usd"] == 0.00003
    assert over.value.details["spent_usd"] + over.value.details["estimated_cost_usd"] > 0.00003
    assert jobs._limiter.state()[1]["daily_budget"]["committed_usd"] == over.value.details["spent_usd"]


def run_job(tenant: Tenant, key: str, **fields: Any) -> Any:
    jobs = bootstrap.job_service(tenant)
    request = JobRequest.model_validate(
        {"message": "usage", "model": "sim-fast", "max_tokens": 300, **fields}
    )
    created = jobs.create(key, request)
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    return jobs.get(created.job.job_id)


def test_settlement_happens_once_and_totals_equal_the_jobs(stack: StackDescription) -> None:
    tenant = Tenant("ledger")
    jobs = [run_job(tenant, f"k{i}", max_tokens=100 + 50 * i) for i in range(3)]
    assert runner_for(tenant).run(jobs[0].job_id) is Outcome.DONE  # the duplicated completion message
    assert bootstrap.dead_letters(tenant).handle(jobs[0].job_id) is Outcome.DONE  # and a dead letter
    usage = bootstrap.rate_limiter(tenant).usage(None, None)
    totals = usage["totals"]
    assert totals["jobs"] == 3
    assert totals["input_tokens"] == sum(j.usage.input_tokens for j in jobs)
    assert totals["output_tokens"] == sum(j.usage.output_tokens for j in jobs) == 100 + 150 + 200
    assert totals["cost_usd"] == sum(j.cost_nanos for j in jobs) / 1e9
    assert usage["by_model"]["sim-fast"]["jobs"] == 3
    assert usage["limits"]["concurrent_jobs"]["running"] == 0  # every slot released, once
    used = sum(j.usage.input_tokens + j.usage.output_tokens for j in jobs)
    assert usage["limits"]["tokens_per_minute"]["remaining"] >= 200_000 - used  # actual, not the reservation
    # no budget: nothing was reserved against one, and the day's spend is counted for a budget set later
    assert usage["limits"]["daily_budget"]["committed_usd"] == totals["cost_usd"]


def test_a_cancelled_queued_job_is_refunded(stack: StackDescription) -> None:
    tenant = Tenant("refund")
    jobs = bootstrap.job_service(tenant)
    created = jobs.create(
        "k", JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 5000})
    )
    limits = bootstrap.rate_limiter(tenant)
    assert limits.state()[1]["tokens_per_minute"]["remaining"] < 200_000 - 4000  # (refill: 3,333/s)
    jobs.cancel(created.job.job_id)
    assert limits.state()[1]["tokens_per_minute"]["remaining"] == 200_000
    assert limits.state()[1]["concurrent_jobs"]["running"] == 0


def test_a_settlement_at_a_high_limit_is_written_in_integers(stack: StackDescription) -> None:
    """A 1-token difference at 100M tokens a minute is 0.6 us: the first version wrote it as the float
    6E-7 (seconds), which the store refused, and the job never ended."""
    tenant = Tenant("high-limit")
    set_tenant_limits(
        bootstrap.usage_store(tenant), TenantLimits(100_000_000, 1_000_000_000, 16), defaults=defaults()
    )
    done = run_job(tenant, "k", max_tokens=7)
    assert done.status == "completed"
    config = bootstrap.settings()
    bucket = client("dynamodb", stack).get_item(
        TableName=config.usage_table,
        Key={"pk": {"S": "high-limit#usage#tenant"}, "sk": {"S": "bucket#minute"}},
    )["Item"]
    assert bucket["tat_us"]["N"].isdigit()  # an integer: no fraction, no exponent


def test_a_budget_set_during_the_day_counts_what_the_tenant_already_spent(stack: StackDescription) -> None:
    """Jobs admitted without a budget add nothing to the day's commitments: a budget set after them
    allowed its whole amount again, and its refusal said "Today's spend (0.0000 USD)". Counting adds,
    never sets: a reservation made under an earlier budget is kept (a hostile review's case)."""
    tenant = Tenant("late-budget")
    spent = sum(run_job(tenant, f"k{i}").cost_nanos for i in range(2))  # no budget yet
    store = bootstrap.usage_store(tenant)
    limits = TenantLimits(1_000_000, 10_000_000, 16, daily_budget_nanos=spent + spent // 4)
    set_tenant_limits(store, limits, defaults=defaults())
    another = JobRequest.model_validate({"message": "usage", "model": "sim-fast", "max_tokens": 300})
    with pytest.raises(BudgetExceeded) as over:  # a job like them does not fit what is left
        bootstrap.job_service(tenant).create("k2", another)
    assert over.value.details["spent_usd"] == spent / 1e9

    def committed() -> int:
        state = bootstrap.rate_limiter(tenant).usage(None, None)
        return round(state["limits"]["daily_budget"]["committed_usd"] * 1e9)

    assert committed() == spent
    set_tenant_limits(
        store, limits._replace(daily_budget_nanos=10 * spent), defaults=defaults()
    )  # a new amount: still counting
    assert committed() == spent
    bootstrap.job_service(tenant).create("k3", another)  # stays queued: its reservation is held
    reserved = committed() - spent
    assert reserved > 0
    set_tenant_limits(
        store, limits._replace(daily_budget_nanos=None), defaults=defaults()
    )  # no budget for a while
    later = run_job(tenant, "k4").cost_nanos
    set_tenant_limits(
        store, limits._replace(daily_budget_nanos=10 * spent), defaults=defaults()
    )  # again, the same day
    assert committed() == spent + reserved + later  # what it held, and what was spent without it
    budgeted = run_job(tenant, "k5").cost_nanos  # settled under the budget: its reservation replaced
    held = committed()
    assert held == spent + reserved + later + budgeted
    set_tenant_limits(store, limits._replace(daily_budget_nanos=None), defaults=defaults())
    set_tenant_limits(store, limits._replace(daily_budget_nanos=10 * spent), defaults=defaults())
    assert committed() == held  # nothing counted twice


def test_a_budgeted_job_that_ends_after_midnight_is_counted_on_the_day_it_settled(
    stack: StackDescription,
) -> None:
    """The rollups are the settlement's day's; the count of what a day's commitments hold went to the
    reservation's day, so a budget starting the next day counted the job's cost a second time."""
    tenant = Tenant("midnight")
    store = bootstrap.usage_store(tenant)
    before = Clock(now=datetime(2027, 1, 1, 23, 59, 50, tzinfo=UTC).timestamp())
    after = Clock(now=datetime(2027, 1, 2, 0, 0, 10, tzinfo=UTC).timestamp())
    budget = TenantLimits(1_000_000, 10_000_000, 16, daily_budget_nanos=10**9)  # the deployment's
    created = service("midnight", before, daily_budget_nanos=10**9).create("k1", job())
    runner = runner_for(tenant)
    runner._limiter = RateLimiter(store, budget, clock_ms=after.ms)  # it settles after midnight
    assert runner.run(created.job.job_id) is Outcome.DONE
    cost = bootstrap.job_service(tenant).get(created.job.job_id).cost_nanos

    def committed(day: str) -> int:
        return int((store._get(f"day#{day}") or {}).get("committed_nanos", 0))

    assert committed("2027-01-01") == cost  # its reservation's day holds it
    set_tenant_limits(
        store, budget, defaults=defaults(), now=int(after.ms()) + 1000
    )  # its own budget, the next day
    assert committed("2027-01-02") == 0  # nothing to count: the job is held by the day before


def test_a_budget_set_while_jobs_run_counts_them_once_they_settle(stack: StackDescription) -> None:
    """The billing tester set a $0.001 budget while five unbudgeted jobs ran: they settled $0.0023
    and the day's commitments never moved, so the tenant, three times over its budget, was still
    admitted. Every settlement now counts the day's spend, budgeted or not, exactly once."""
    tenant = Tenant("budget-while-running")
    created = bootstrap.job_service(tenant).create("k1", job(tokens=300))  # admitted without a budget
    store = bootstrap.usage_store(tenant)
    set_tenant_limits(
        store, TenantLimits(1_000_000, 10_000_000, 16, daily_budget_nanos=10), defaults=defaults()
    )  # $1e-8
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    cost = bootstrap.job_service(tenant).get(created.job.job_id).cost_nanos
    state = bootstrap.rate_limiter(tenant).usage(None, None)
    assert cost > 10 and round(state["limits"]["daily_budget"]["committed_usd"] * 1e9) == cost
    with pytest.raises(BudgetExceeded):
        bootstrap.job_service(tenant).create("k2", job(tokens=7))
    set_tenant_limits(
        store, TenantLimits(1_000_000, 10_000_000, 16, daily_budget_nanos=None), defaults=defaults()
    )
    set_tenant_limits(
        store, TenantLimits(1_000_000, 10_000_000, 16, daily_budget_nanos=10 * cost), defaults=defaults()
    )
    state = bootstrap.rate_limiter(tenant).usage(None, None)
    assert round(state["limits"]["daily_budget"]["committed_usd"] * 1e9) == cost  # not counted twice


def test_a_raised_daily_limit_keeps_what_the_day_used(stack: StackDescription) -> None:
    tenant = Tenant("raised-limit")
    store = bootstrap.usage_store(tenant)
    set_tenant_limits(store, TenantLimits(1_000_000, 5_000, 16), defaults=defaults())
    used = run_job(tenant, "k1", max_tokens=300)
    spent = used.usage.input_tokens + used.usage.output_tokens

    def day_remaining() -> int:
        return int(bootstrap.rate_limiter(tenant).usage(None, None)["limits"]["tokens_per_day"]["remaining"])

    assert 5_000 - spent - 1 <= day_remaining() <= 5_000 - spent + 1  # the day refills meanwhile
    set_tenant_limits(store, TenantLimits(1_000_000, 10_000_000, 16), defaults=defaults())
    # what the day used still counts (it refills at 116 tokens a second now); read at the old scale,
    # the bucket said 2,000 times what it had used
    assert 10_000_000 - spent - 1 <= day_remaining() <= 10_000_000


def test_jobs_reserved_together_and_cancelled_in_order_leave_the_bucket_whole(
    stack: StackDescription,
) -> None:
    """Sixteen jobs reserved together, cancelled 30 s later before their first token: had they
    reserved what they used (nothing) the bucket would be whole. Each refund counted only what of its
    reservation had not refilled since its own take, and the bucket stayed 6,848 tokens short."""
    clock = Clock()
    jobs = service("queued-behind", clock, tokens_per_minute=20_000)
    created = [jobs.create(f"k{i}", job(tokens=1_000)).job for i in range(16)]
    reserved = sum(made.usage.estimated_tokens for made in created)  # 1,053 each
    limits = jobs._limiter
    assert limits.state()[1]["tokens_per_minute"]["remaining"] == 20_000 - reserved
    clock.now += 30  # 10,000 refill
    for made in created:
        assert jobs.cancel(made.job_id).status == "cancelled"
    assert limits.state()[1]["tokens_per_minute"]["remaining"] == 20_000
    assert limits.state()[1]["concurrent_jobs"]["running"] == 0


@pytest.mark.parametrize("own", [True, False], ids=["own-limits", "defaults"])
def test_a_settlement_raced_by_a_change_of_limits_is_settled_again_on_the_scale_it_is_written_at(
    stack: StackDescription, own: bool
) -> None:
    """A change of limits that lands between a settlement's read of the limits and its write: the
    settlement, converted at the scale the bucket had left, gave back 225 of 4,500 tokens after a
    lowering from 100,000 to 5,000 a day. The job's end transaction now holds only while each moved
    bucket's scale version is the one read, on the tenant's own limits as on the deployment's
    defaults, and settled again it refunds nothing: the reservation was taken at the old scale, and
    the lowering carried it over whole."""
    tenant = Tenant(f"raced-{'own' if own else 'defaults'}")
    clock = Clock()
    jobs = service(tenant.id, clock, tokens_per_minute=1_000_000, tokens_per_day=100_000)
    store = bootstrap.usage_store(tenant)
    deployment = TenantLimits(1_000_000, 100_000, 1000)
    if own:
        set_tenant_limits(store, TenantLimits(1_000_000, 100_000, 500), defaults=deployment, now=clock.ms())
    made = jobs.create("k", job(tokens=4_447)).job  # 4,500 tokens
    lowered = TenantLimits(1_000_000, 5_000, 1000)
    # the operator's command lands between the settlement's read and write
    ends = before_the_first(
        jobs._jobs, "end", lambda: set_tenant_limits(store, lowered, defaults=deployment, now=clock.ms())
    )
    assert jobs.cancel(made.job_id).status == "cancelled"
    assert len(ends) == 2  # refused once (nothing written), settled again
    day = jobs._limiter.state()[1]["tokens_per_day"]
    assert (day["limit"], day["remaining"]) == (5_000, 500)  # not 725
    rollups = jobs._limiter.usage(None, None)["totals"]
    assert rollups["jobs"] == 1  # counted once


def test_a_withdrawal_raced_by_a_change_of_limits_is_settled_again(stack: StackDescription) -> None:
    """The undo of an admission whose job could not be queued settles its reservation as a job's end
    does, on the same condition."""
    tenant = Tenant("withdraw-raced")
    clock = Clock()
    jobs = service(tenant.id, clock, tokens_per_minute=1_000_000, tokens_per_day=100_000)
    store = bootstrap.usage_store(tenant)
    deployment = TenantLimits(1_000_000, 100_000, 1000)

    class BrokenQueue:
        def send(self, job_id: str, tenant_id: str, **message: Any) -> None:
            raise ConnectionError("queue down")

    lowered = TenantLimits(1_000_000, 5_000, 1000)
    jobs._queue = BrokenQueue()  # type: ignore[assignment]
    calls = before_the_first(
        jobs._jobs,
        "withdraw",
        lambda: set_tenant_limits(store, lowered, defaults=deployment, now=clock.ms()),
    )
    with pytest.raises(DependencyUnavailable):
        jobs.create("k", job(tokens=4_447))
    assert len(calls) == 2
    state = jobs._limiter.state()[1]
    assert state["tokens_per_day"]["remaining"] == 500 and state["concurrent_jobs"]["running"] == 0


def test_a_raise_and_a_return_between_a_settlements_read_and_write_is_seen(stack: StackDescription) -> None:
    """Raised to 6,000 a minute and set back to the defaults between a cancel's settlement read and
    its write, with a job of 1,000 admitted at the raised rate: the limits were the same at both ends
    (no limits item at all), and the refund computed before gave back 500 tokens of a minute the new
    job holds whole. The buckets' scale versions moved twice."""
    clock = Clock()
    tenant = Tenant("raise-and-return")
    jobs = service(tenant.id, clock)  # 1,000 a minute, the deployment's defaults here
    deployment = TenantLimits(1000, 1_000_000, 1000)
    store = bootstrap.usage_store(tenant)
    jobs.create("a", job(tokens=447))  # 500
    second = jobs.create("b", job(tokens=447)).job
    clock.now += 10

    def raise_and_back() -> None:
        set_tenant_limits(store, TenantLimits(6000, 1_000_000, 1000), defaults=deployment, now=clock.ms())
        clock.now += 10
        jobs.create("c", job(tokens=947))  # 1,000
        set_tenant_limits(store, None, defaults=deployment, now=clock.ms())

    ends = before_the_first(jobs._jobs, "end", raise_and_back)
    assert jobs.cancel(second.job_id).status == "cancelled"
    assert len(ends) == 2
    assert jobs._limiter.state()[1]["tokens_per_minute"]["remaining"] == 0


def test_an_admission_raced_by_a_lowering_is_taken_at_the_new_scale(stack: StackDescription) -> None:
    """Admission's takes held on the bucket's TAT alone: planned at 100,000 a minute (500 tokens, 0.3 s
    of the bucket) and written after a lowering to 1,000, they took 5 tokens of the new bucket. They
    hold on its scale version too: refused, admission reads again and takes 500."""
    clock = Clock()
    tenant = Tenant("admission-raced")
    jobs = service(tenant.id, clock, tokens_per_minute=100_000, tokens_per_day=10_000_000)
    deployment = TenantLimits(100_000, 10_000_000, 1000)
    store = bootstrap.usage_store(tenant)
    lowered = TenantLimits(1_000, 10_000_000, 1000)
    calls = before_the_first(
        jobs._jobs, "admit", lambda: set_tenant_limits(store, lowered, defaults=deployment, now=clock.ms())
    )
    made = jobs.create("k", job(tokens=447)).job  # 500
    assert len(calls) == 2
    remaining = jobs._limiter.state()[1]["tokens_per_minute"]["remaining"]
    assert remaining == 1_000 - made.usage.estimated_tokens == 500


def test_jobs_cancelled_at_once_are_refunded_between_their_own_takes_and_whole(
    stack: StackDescription,
) -> None:
    """Sixteen cancels at once (a client cancelling its batch), each settlement read before any is
    written: every refund holds on the bucket's refund counter covering what its place still does,
    so they do not make each other stale. What comes back depends on the order they land in (a
    refund counts the refunds of the jobs behind it as if they were ahead), never less than the
    count from each job's own take (6,848 short) and never more than whole."""
    clock = Clock()
    jobs = service("cancelled-at-once", clock, tokens_per_minute=20_000)
    created = [jobs.create(f"k{i}", job(tokens=1_000)).job for i in range(16)]
    reserved = sum(made.usage.estimated_tokens for made in created)
    clock.now += 30
    barrier = threading.Barrier(16)
    real_end = jobs._jobs.end
    first: set[int] = set()
    lock = threading.Lock()

    def end_together(*args: Any) -> Any:
        with lock:
            wait = threading.get_ident() not in first
            first.add(threading.get_ident())
        if wait:  # every first settlement read before any is written
            barrier.wait(timeout=60)
        return real_end(*args)

    jobs._jobs.end = end_together  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def cancel(job_id: str) -> None:
        try:
            assert jobs.cancel(job_id).status == "cancelled"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=cancel, args=(made.job_id,)) for made in created]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    limits = jobs._limiter.state()[1]
    assert limits["concurrent_jobs"]["running"] == 0
    assert 20_000 - (reserved - 10_000) <= limits["tokens_per_minute"]["remaining"] <= 20_000


def test_a_job_admitted_between_a_refunds_read_and_its_end_transaction_makes_it_settle_again(
    stack: StackDescription,
) -> None:
    """A refund capped by time, computed at the settlement's read: 29 s passed before the end's
    transaction (a conflict retried, a paused worker, the settling host's clock behind) and a job
    was admitted, queued behind the time given back, most of which had refilled. The refund holds on
    no take having landed since its read (DynamoDB's `tat_us <= :tat`): refused, settled again."""
    clock = Clock()
    jobs = service("refund-late", clock)  # 1,000 a minute
    jobs.create("x", job(tokens=344))  # 400: 0-24 s of the minute
    late = jobs.create("a", job(tokens=544)).job  # 600: 24-60 s
    clock.now += 30
    admitted: list[Job] = []

    def later_a_job() -> None:
        clock.now += 29
        admitted.append(jobs.create("b", job(tokens=844)).job)  # 900

    ends = before_the_first(jobs._jobs, "end", later_a_job)
    assert jobs.cancel(late.job_id).status == "cancelled"
    assert len(ends) == 2
    exact = 1_000 - admitted[0].usage.estimated_tokens  # x refilled; b alone (100; 583 before)
    assert jobs._limiter.state()[1]["tokens_per_minute"]["remaining"] <= exact


def test_a_debt_raced_by_a_restart_is_charged_from_now_once(stack: StackDescription) -> None:
    """A debt charged from now (the bucket had refilled) holds on the TAT it read (`tat_us = :tat`):
    a job admitted between its read and its write restarted the bucket, and the debt charged the
    idle time on top of that job's take."""
    clock = Clock()
    jobs = service("debt-raced", clock)  # 1,000 a minute
    first = jobs.create("a", job(tokens=44)).job  # 100
    clock.now += 120  # whole again
    ends: list[str] = []
    end = JobEnd(
        status="cancelled",
        progress=Progress(),
        usage=Usage(estimated_tokens=first.usage.estimated_tokens),
        cost_nanos=0,
        completed_at=rfc3339(from_epoch(clock())),
        output="",
    )

    def end_after_a_restart(settlement: Settlement) -> Job:
        ends.append("end")
        if len(ends) == 1:
            jobs.create("b", job(tokens=44))  # 100, restarting the bucket
        return jobs._jobs.end(first.job_id, end, EndGuard("queued", "debt"), settlement)

    used = (ModelUsage("sim-fast", 100, 100, 1),)  # 100 over its reservation
    ended = jobs._limiter.settled(first.job_id, reservation_of(first), used, end_after_a_restart)
    assert ended.status == "cancelled" and len(ends) == 2
    assert jobs._limiter.state()[1]["tokens_per_minute"]["remaining"] == 800  # 100 taken, 100 owed


def own_limits(tenant: str, clock: Clock, minute: int, day: int) -> tuple[JobService, Any, TenantLimits]:
    """A tenant whose own limits are the deployment's defaults (``minute`` and ``day`` tokens): its
    jobs API, its usage store and those defaults."""
    deployment = TenantLimits(minute, day, 1000)
    store = bootstrap.usage_store(Tenant(tenant))
    set_tenant_limits(store, deployment, defaults=deployment, now=clock.ms())
    return service(tenant, clock, tokens_per_minute=minute, tokens_per_day=day), store, deployment


def a_change_lands_during_the_read(
    monkeypatch: pytest.MonkeyPatch, client: Any, change: Callable[[], None]
) -> list[str]:
    """Run ``change`` (once) while a BatchGetItem of a tenant's limits item and other items is under
    way, as DynamoDB may let it land: a BatchGetItem reads each item on its own, not a snapshot, so
    the change may fall between them (here: the limits read before it, the rest after). The reads
    made, one entry each."""
    reads: list[str] = []
    batch_get_item = client.batch_get_item

    def is_limits(key: dict[str, Any]) -> bool:
        return key.get("sk") == {"S": "limits"}

    def batch(RequestItems: dict[str, Any], **rest: Any) -> Any:  # noqa: N803 (boto3's name)
        reads.append("BatchGetItem")
        wanted = [key for entry in RequestItems.values() for key in entry["Keys"]]
        if len(reads) > 1 or not any(is_limits(key) for key in wanted) or len(wanted) == 1:
            return batch_get_item(RequestItems=RequestItems, **rest)
        first = {t: {**e, "Keys": [k for k in e["Keys"] if is_limits(k)]} for t, e in RequestItems.items()}
        then = {t: {**e, "Keys": [k for k in e["Keys"] if not is_limits(k)]} for t, e in RequestItems.items()}
        answers = batch_get_item(RequestItems={t: e for t, e in first.items() if e["Keys"]}, **rest)
        change()
        more = batch_get_item(RequestItems={t: e for t, e in then.items() if e["Keys"]}, **rest)
        responses = answers.setdefault("Responses", {})
        for table, items in more.get("Responses", {}).items():
            responses.setdefault(table, []).extend(items)
        return answers

    monkeypatch.setattr(client, "batch_get_item", batch)
    return reads


def test_a_settlement_read_across_a_change_of_limits_moves_the_bucket_in_its_own_scale(
    stack: StackDescription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day raised from 5,000 to 100,000 while a cancel's settlement read the limits and the buckets:
    read item by item, the settlement had the old limit and the new scale version, and its refund of
    4,000 tokens, converted at 5,000 a day and written on condition of the new version, gave back
    0.8 of a day on a bucket where 4,500 tokens were 0.045 of one: the other job's 500 were forgiven
    too. The bucket records the limit its time is in, read from the same item as its scale version:
    the settlement is converted at that scale, whatever the limits item said."""
    clock = Clock()
    jobs, store, deployment = own_limits("torn-settlement", clock, 1_000_000, 5_000)
    kept = jobs.create("kept", job(tokens=447)).job  # 500, still queued at the end
    cancelled = jobs.create("cancelled", job(tokens=3_947)).job  # 4,000
    raised = TenantLimits(1_000_000, 100_000, 1000)
    reads = a_change_lands_during_the_read(
        monkeypatch,
        store._table.client,
        lambda: set_tenant_limits(store, raised, defaults=deployment, now=clock.ms()),
    )
    assert jobs.cancel(cancelled.job_id).status == "cancelled"
    assert reads[:2] == ["BatchGetItem", "BatchGetItem"]  # torn, then the change's own read
    monkeypatch.undo()
    day = jobs._limiter.state()[1]["tokens_per_day"]
    assert (day["limit"], day["remaining"]) == (100_000, 100_000 - kept.usage.estimated_tokens)


def test_an_admission_read_across_a_change_of_limits_is_refused_and_read_again(
    stack: StackDescription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minute lowered from 100,000 to 1,000 while admission read the limits and the buckets: read
    item by item, it planned at 100,000 a minute on condition of the scale version the lowering had
    just counted (500 tokens took 5 of the new bucket's 1,000). The bucket's recorded scale now
    carries the tokens over, but the decision was the old limit's: a job of 5,000 tokens, which
    never fits in 1,000, was admitted. The takes hold on the limits item as read: refused, admission
    reads again and refuses the job, taking nothing."""
    clock = Clock()
    jobs, store, deployment = own_limits("torn-admission", clock, 100_000, 10_000_000)
    lowered = TenantLimits(1_000, 10_000_000, 1000)
    reads = a_change_lands_during_the_read(
        monkeypatch,
        store._table.client,
        lambda: set_tenant_limits(store, lowered, defaults=deployment, now=clock.ms()),
    )
    with pytest.raises(TokenLimitExceeded) as refused:
        jobs.create("k", job(tokens=4_947))  # 5,000
    assert refused.value.headers["x-should-retry"] == "false"
    assert reads[:2] == ["BatchGetItem", "BatchGetItem"]  # torn, then the change's own read
    monkeypatch.undo()
    minute = jobs._limiter.state()[1]["tokens_per_minute"]
    assert (minute["limit"], minute["remaining"]) == (1_000, 1_000)
    assert store.state(None, "").rescales["minute"] == 1  # the lowering's alone


def test_a_redeploy_that_lowers_the_defaults_is_carried_over_by_the_next_take(
    stack: StackDescription,
) -> None:
    """20,000 of 100,000 a minute reserved, then the deployment's defaults lowered to 1,000 (a redeploy,
    which rescales nothing when it happens): read at 1,000, the bucket's time said 800 remaining
    where the 20,000 outstanding leave none. The bucket records the limit its time is in: it is read
    in that scale, and the next take converts it in its own conditional write."""
    clock = Clock()
    tenant = Tenant("redeployed-lower")
    service(tenant.id, clock, tokens_per_minute=100_000).create("a", job(tokens=19_947))  # 20,000
    redeployed = service(tenant.id, clock, tokens_per_minute=1_000)
    assert redeployed._limiter.state()[1]["tokens_per_minute"]["remaining"] == 0
    with pytest.raises(TokenLimitExceeded):
        redeployed.create("b", job(tokens=47))  # 100
    clock.now += 30  # 20,000 at the old rate have refilled: the take converts an empty bucket
    redeployed.create("c", job(tokens=47))
    assert redeployed._limiter.state()[1]["tokens_per_minute"]["remaining"] == 900
    usage = bootstrap.usage_store(tenant).state(None, "")
    assert (usage.scales["minute"], usage.rescales["minute"], usage.lowerings["minute"]) == (1_000, 1, 1)


def test_limits_set_after_a_redeploy_carry_over_from_the_scale_the_bucket_is_in(
    stack: StackDescription,
) -> None:
    """500 of 1,000 a minute reserved, the defaults raised to 100,000 by a redeploy, then the tenant
    given 10,000 of its own before any take: converted from the defaults now, the bucket's 30 s of
    time were 50,000 tokens, a minute's debt at 10,000. From the scale it is in, 500 are."""
    clock = Clock()
    tenant = Tenant("redeployed-then-set")
    service(tenant.id, clock, tokens_per_minute=1_000).create("a", job(tokens=447))  # 500
    raised = TenantLimits(100_000, 1_000_000, 1000)
    store = bootstrap.usage_store(tenant)
    set_tenant_limits(store, TenantLimits(10_000, 1_000_000, 1000), defaults=raised, now=clock.ms())
    jobs = service(tenant.id, clock, tokens_per_minute=100_000)
    assert jobs._limiter.state()[1]["tokens_per_minute"] == {
        "limit": 10_000,
        "remaining": 9_500,
        "reset_seconds": 3,
    }


def test_a_change_of_limits_holds_on_a_bucket_it_does_not_move(stack: StackDescription) -> None:
    """900 of 1,000 a minute used, the defaults raised to 100,000 by a redeploy, and the tenant pinned
    back at 1,000 (nothing to move: the bucket is in 1,000's scale) while an admission converts the
    bucket to 100,000's: the change holds on the bucket's scale version, is refused once, and moves
    the bucket back from the scale it found."""
    clock = Clock()
    tenant = Tenant("pinned-while-converted")
    service(tenant.id, clock, tokens_per_minute=1_000).create("a", job(tokens=847))  # 900
    redeployed = service(tenant.id, clock, tokens_per_minute=100_000)
    store = bootstrap.usage_store(tenant)
    calls = before_the_first(store, "change_limits", lambda: redeployed.create("b", job(tokens=59_947)))
    pinned = TenantLimits(1_000, 1_000_000, 1000)
    set_tenant_limits(store, pinned, defaults=TenantLimits(100_000, 1_000_000, 1000), now=clock.ms())
    assert len(calls) == 2
    usage = store.state(None, "")
    assert usage.limits == pinned and usage.scales["minute"] == 1_000
    clock.now += 37
    assert redeployed._limiter.state()[1]["tokens_per_minute"]["remaining"] == 616
