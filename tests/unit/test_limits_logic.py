"""The rate limiter's arithmetic in integers: GCRA buckets in microseconds, settlements that refund only
while a bucket has not refilled, budgets in nano-dollars, learning within bounds."""

from __future__ import annotations

import pytest

from spool_core.clock import from_epoch, rfc3339
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import MINUTE_US, Bucket, Estimate, ModelUsage, TenantLimits, UsageState
from spool_core.limits.service import RateLimiter
from spool_core.units import usd_text
from tests.ledger import Clock, MemoryLedger

NOW_US = 1_800_000_000_000_000
DEFAULTS = TenantLimits(tokens_per_minute=200_000, tokens_per_day=10_000_000, max_concurrent_jobs=16)


def test_a_bucket_takes_what_fits_and_says_when_the_rest_will() -> None:
    bucket = Bucket("minute", 1000, MINUTE_US)
    assert bucket.cost_us(70) == 4_200_000
    assert bucket.cost_us(1) == 60_000  # never under-charged
    assert Bucket("minute", 7, MINUTE_US).cost_us(1) == 8_571_429  # rounded up
    full = bucket.take(None, NOW_US, 70)
    assert full is not None and (full.kind, full.cost_us) == ("restart", 4_200_000)
    tat = NOW_US + 4_200_000
    assert bucket.remaining(tat, NOW_US) == 930
    advance = bucket.take(tat, NOW_US, 900)
    assert (
        advance is not None
        and advance.kind == "advance"
        and advance.latest == NOW_US + MINUTE_US - 54_000_000
    )
    assert bucket.take(tat, NOW_US, 931) is None
    assert bucket.take(None, NOW_US, 1001) is None  # more than the whole bucket: never
    assert bucket.available_at(tat, NOW_US, 931) == NOW_US + 60_000  # one token's refill away
    assert bucket.remaining(NOW_US - 1, NOW_US) == 1000  # a TAT in the past is a full bucket


def state(**fields: object) -> UsageState:
    return UsageState(**fields)  # type: ignore[arg-type]


def limiter(clock: Clock, **limits: int | None) -> RateLimiter:
    settings = {"tokens_per_minute": 1000, "tokens_per_day": 1_000_000, "max_concurrent_jobs": 10, **limits}
    return RateLimiter(MemoryLedger().tenant("t"), TenantLimits(**settings), clock_ms=clock.ms)  # type: ignore[arg-type]


def test_a_plan_refuses_with_the_numbers_and_writes_nothing() -> None:
    clock = Clock()
    limits = limiter(clock, max_concurrent_jobs=2, daily_budget_nanos=1_000_000_000)
    with pytest.raises(TooManyConcurrentJobs) as busy:
        limits.plan(state(running=2), 10, 0)
    assert busy.value.details == {"running": 2, "limit": 2}
    spent = clock.ms() * 1000 + MINUTE_US  # the minute bucket is empty
    with pytest.raises(TokenLimitExceeded) as empty:
        limits.plan(state(tats={"minute": spent, "day": None}), 100, 0)
    assert empty.value.details["tokens_remaining"] == 0
    assert empty.value.details["window"] == "minute"
    assert empty.value.headers["Retry-After"] == "6"  # 100 tokens refill in 6 s
    with pytest.raises(BudgetExceeded) as over:
        limits.plan(state(committed_nanos=600_000_000), 10, 500_000_000)
    assert over.value.details["spent_usd"] == 0.6
    assert over.value.details["estimated_cost_usd"] == 0.5
    assert "(0.60 USD) plus this job's estimate (0.50 USD) exceeds the daily budget (1.00 USD)" in (
        over.value.message
    )
    assert "x-should-retry" not in over.value.headers  # it fits tomorrow
    assert over.value.suggestions[0].startswith("Retry after the budget resets")
    plan = limits.plan(state(committed_nanos=500_000_000), 10, 500_000_000)
    assert plan.budget_room_nanos == 500_000_000
    assert plan.reservation.budgeted
    # More than the whole budget: a retry at midnight is refused again (it said to retry then)
    with pytest.raises(BudgetExceeded) as never:
        limits.plan(state(), 10, 1_500_000_000)
    assert "more than the whole daily budget (1.00 USD): waiting will not help" in never.value.message
    assert never.value.headers["x-should-retry"] == "false" and "Retry-After" in never.value.headers
    assert not any("midnight" in s for s in never.value.suggestions)
    assert never.value.suggestions[0].startswith("Lower max_tokens")


def test_a_job_larger_than_a_whole_bucket_says_waiting_will_not_help() -> None:
    clock = Clock()
    limits = limiter(clock)
    now_us = clock.ms() * 1000
    with pytest.raises(TokenLimitExceeded) as fresh:  # a full bucket: whole again at once
        limits.plan(state(), 1500, 0)
    assert "more than the whole limit of 1,000 per minute" in fresh.value.message
    assert fresh.value.details["reset_at"] == rfc3339(from_epoch(now_us / 1e6))
    assert fresh.value.headers["Retry-After"] == "1"
    assert fresh.value.headers["x-should-retry"] == "false"  # SDKs that retry by themselves stop
    assert "at most 1,000 tokens fit" in fresh.value.suggestions[0]
    half = now_us + MINUTE_US // 2  # half the minute bucket taken: whole again in 30 s, not at midnight
    with pytest.raises(TokenLimitExceeded) as used:
        limits.plan(state(tats={"minute": half, "day": None}), 1500, 0)
    assert used.value.details["reset_at"] == rfc3339(from_epoch(half / 1e6))
    assert used.value.headers["Retry-After"] == "30"
    with pytest.raises(TokenLimitExceeded) as daily:  # past the day's bucket too: it names the day
        limiter(clock, tokens_per_minute=10**7, tokens_per_day=5000).plan(state(), 6000, 0)
    assert daily.value.details["window"] == "day" and "per day" in daily.value.message
    with pytest.raises(TokenLimitExceeded) as fits_later:  # one that fits once the bucket refills
        limits.plan(state(tats={"minute": half, "day": None}), 900, 0)
    assert "x-should-retry" not in fits_later.value.headers


def test_settlement_refunds_only_what_is_still_outstanding() -> None:
    """The bucket refills as time passes: a refund of what has refilled since the reservation would
    grant more than the limit. The billing tester reserved 900 of 1,000 a minute, reserved another
    900 a minute later and refunded the first one unused: a third 900 went in, 1,800 tokens in 1 s."""
    clock = Clock()
    limits = limiter(clock)
    plan = limits.plan(state(), 500, 1000)  # 30 s of the minute's bucket, 43.2 s of the day's
    used = (ModelUsage("sim-fast", 100, 100, 40),)
    soon = limits.settle("job_1", plan.reservation, used)
    assert dict(soon.bucket_deltas) == {"minute": -18_000_000, "day": -25_920_000}  # 300 tokens back
    # no budget: nothing was committed, and the day's spend counts the job (a budget set meanwhile)
    assert soon.budget == (plan.reservation.day, 40)
    clock.now += 35  # the minute's 500 tokens have refilled; 95 of the day's are still out
    later = limits.settle("job_1", plan.reservation, used)
    assert dict(later.bucket_deltas) == {"day": -8_208_000}  # 95 tokens back
    clock.now += 26
    late = limits.settle("job_1", plan.reservation, used)
    assert dict(late.bucket_deltas) == {}
    more = limits.settle("job_1", plan.reservation, (ModelUsage("sim-fast", 400, 300, 0),))
    assert dict(more.bucket_deltas) == {"minute": 12_000_000, "day": 17_280_000}  # charged, always
    # a debt of at most one period, however far a job ran over: the tenant is out for a minute at
    # most on the minute's bucket (a 66-day lockout outlived any change of limits)
    huge = limits.settle("job_1", plan.reservation, (ModelUsage("sim-fast", 100, 10**7, 0),))
    assert dict(huge.bucket_deltas)["minute"] == 60_000_000
    budgeted = limiter(clock, daily_budget_nanos=10**9).plan(state(), 500, 1000)
    assert limits.settle("job_2", budgeted.reservation, used).budget == (budgeted.reservation.day, 40 - 1000)


def test_learning_moves_the_correction_within_bounds() -> None:
    clock = Clock()
    ledger = MemoryLedger(clock_ms=clock.ms)
    learner = RateLimiter(ledger.tenant("learn"), TenantLimits(1000, 10**6, 10), clock_ms=clock.ms)
    estimate = Estimate(input_raw=1000, correction_milli=1000, input_tokens=1000, output_tokens=100)
    for _ in range(30):
        learner.learn("sim-fast", estimate, input_tokens=3000)  # 3x the estimate
    learned = ledger.tenant("learn").state("sim-fast", "2027-01-15")
    assert learned.correction_milli == 2000  # bounded
    for _ in range(3):
        learner.learn("sim-fast", estimate, input_tokens=800)
    moved = learner.estimate(ledger.tenant("learn").state("sim-fast", "2027-01-15"), 1000, 500)
    assert 800 < moved.correction_milli < 2000
    assert moved.input_tokens == -(-1000 * moved.correction_milli // 1000)
    assert moved.output_tokens == 500  # all of max_tokens, whatever past jobs used: limits are caps


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (5_000_000_000, "5.00"),
        (1_234_560_000_000, "1,234.56"),
        (400_000, "0.0004"),
        (362_700, "0.0003627"),
        (1, "0.000000001"),
        (10**16 + 1, "10,000,000.000000001"),
        (-1_500_000_000, "-1.50"),
        (0, "0.00"),
    ],
)
def test_amounts_in_messages_keep_their_significant_digits(nanos: int, text: str) -> None:
    """A budget of $0.0004 read "exceeds the daily budget (0.00 USD)"."""
    assert usd_text(nanos) == text


def test_a_changed_token_limit_keeps_what_is_outstanding_in_its_bucket() -> None:
    """The billing tester had used 4,046 of 5,000 tokens a day; raised to 10 million a day, the
    bucket read as 5,984,350 remaining: the TAT is time, and a token's share of the period depends
    on the limit. Lowered, the same scaling let the day's spend shrink with the limit."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    ledger = MemoryLedger(clock_ms=clock.ms)
    store = ledger.tenant("acme")
    before = TenantLimits(tokens_per_minute=100_000, tokens_per_day=5_000, max_concurrent_jobs=4)
    set_tenant_limits(store, before, defaults=DEFAULTS, now=clock.ms())
    limiter = RateLimiter(store, before, clock_ms=clock.ms)
    now_us = clock.ms() * 1000
    day = store.state(None, "x").tats  # nothing taken yet
    assert day == {"minute": None, "day": None}
    taken = Bucket("day", 5_000, 86_400_000_000).take(None, now_us, 4_046)
    assert taken is not None
    ledger.usage["acme"]["bucket#day"] = {"tat_us": taken.now_us + taken.cost_us}

    def remaining(limits: TenantLimits) -> int:
        return limiter.buckets(limits)[1].remaining(store.state(None, "x").tats["day"], clock.ms() * 1000)

    assert remaining(before) == 5_000 - 4_046
    raised = before._replace(tokens_per_day=10_000_000)
    set_tenant_limits(store, raised, defaults=DEFAULTS, now=clock.ms())
    assert remaining(raised) == 10_000_000 - 4_046
    lowered = before._replace(tokens_per_day=6_000)
    set_tenant_limits(store, lowered, defaults=DEFAULTS, now=clock.ms())
    assert remaining(lowered) == 6_000 - 4_046
    tiny = before._replace(tokens_per_day=1_000)  # under what is outstanding: a day's debt at most
    set_tenant_limits(store, tiny, defaults=DEFAULTS, now=clock.ms())
    assert remaining(tiny) == 0 and store.state(None, "x").tats["day"] == clock.ms() * 1000 + 86_400_000_000
    assert Bucket("minute", 10, MINUTE_US).rescaled(None, 5, 20) is None  # nothing outstanding: untouched


def test_a_limit_change_that_loses_every_race_changes_nothing_and_can_be_run_again() -> None:
    """The limits and the bucket moves are one write: the first version moved the minute's bucket,
    lost the day's race five times, and the command run again (as its error said) rescaled the
    minute's bucket a second time."""
    from spool_core.errors import Conflict
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    ledger = MemoryLedger(clock_ms=clock.ms)
    store = ledger.tenant("acme")
    before = TenantLimits(tokens_per_minute=1_000, tokens_per_day=10_000, max_concurrent_jobs=4)
    set_tenant_limits(store, before, defaults=DEFAULTS, now=clock.ms())
    now_us = clock.ms() * 1000
    ledger.usage["acme"]["bucket#minute"] = {"tat_us": now_us + 30_000_000}  # 500 of 1,000 used
    ledger.usage["acme"]["bucket#day"] = {"tat_us": now_us + 8_640_000_000}  # 1,000 of 10,000 used
    after = before._replace(tokens_per_minute=100_000, tokens_per_day=1_000_000)
    racing = store.change_limits

    def lose(*args: object) -> bool:  # another job's take moves the day's bucket first
        ledger.usage["acme"]["bucket#day"]["tat_us"] += 1
        return False

    store.change_limits = lose  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        set_tenant_limits(store, after, defaults=DEFAULTS, now=clock.ms())
    assert store.limits() == before and ledger.usage["acme"]["bucket#minute"]["tat_us"] == now_us + 30_000_000
    store.change_limits = racing  # type: ignore[method-assign]
    set_tenant_limits(store, after, defaults=DEFAULTS, now=clock.ms())
    minute, day = RateLimiter.buckets(after)
    tats = store.state(None, "x").tats
    assert minute.remaining(tats["minute"], now_us) == 100_000 - 500  # rescaled once
    assert day.remaining(tats["day"], now_us) in (1_000_000 - 1_001, 1_000_000 - 1_000)
