"""The rate limiter's arithmetic in integers: GCRA buckets in microseconds, settlements that refund only
while a bucket has not refilled, budgets in nano-dollars, learning within bounds."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from spool_core.clock import from_epoch, rfc3339
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import (
    MINUTE_US,
    Bucket,
    Estimate,
    ModelUsage,
    Reservation,
    Settlement,
    TenantLimits,
    UsageState,
)
from spool_core.limits.service import RateLimiter
from spool_core.units import usd_text
from tests.ledger import Clock, MemoryLedger
from tests.ledger import apply_rescale as rescale

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
    assert dict(later.bucket_deltas) == {"day": -8_200_000}  # 94.9 tokens back
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


# ---------------------------------------------------------------------- refunds among other jobs
class Bucketed:
    """One tenant's buckets in the in-memory ledger, admitted and settled as the stores do it: the
    plan's takes applied as their conditional writes would, a settlement checked and applied in one
    step under the ledger's lock (``SettlementStale`` when what it counted on moved)."""

    def __init__(self, limits: TenantLimits, clock: Clock) -> None:
        self.ledger = MemoryLedger(clock_ms=clock.ms)
        self.store = self.ledger.tenant("acme")
        self.limiter = RateLimiter(self.store, limits, clock_ms=clock.ms)
        self.before_commit: list[Callable[[], None]] = []  # what lands between a read and a write
        self.attempts: list[Settlement] = []  # every settlement tried, written or found stale

    def admit(self, tokens: int) -> Reservation:
        plan = self.limiter.plan(self.store.state(None, "x"), tokens, 0)
        with self.ledger.lock:
            for take in plan.takes:
                bucket = self.store._usage.setdefault(f"bucket#{take.bucket}", {})
                if take.rescale is not None:
                    rescale(bucket, take.rescale)
                    continue
                restart = take.kind == "restart"
                bucket["tat_us"] = take.now_us + take.cost_us if restart else bucket["tat_us"] + take.cost_us
                bucket["scale"], bucket["scale_at"] = take.limit, take.version
        return plan.reservation

    def settle(self, reservation: Reservation, used: int) -> None:
        def commit(settlement: Settlement) -> None:
            self.attempts.append(settlement)
            if self.before_commit:
                self.before_commit.pop(0)()
            with self.ledger.lock:
                self.store._check(settlement)
                self.store._settle(settlement)

        self.limiter.settled("job", reservation, (ModelUsage("sim-fast", used, 0, 0),), commit)

    def remaining(self, name: str = "minute") -> int:
        """As ``GET /v1/usage`` says it (a bucket in another scale converted to the limit now)."""
        return int(self.limiter.state()[1][f"tokens_per_{name}"]["remaining"])


def exact_remaining(bucket: Bucket, takes: list[tuple[int, int]], now_us: int) -> int:
    """The bucket had each job taken only what it used, when it was admitted: GCRA replayed."""
    tat: int | None = None
    for at_us, tokens in takes:
        tat = max(tat or at_us, at_us) + bucket.cost_us(tokens)
    return bucket.remaining(tat, now_us)


class Replay:
    """GCRA replayed for one bucket as if each job had reserved what it used, at the moment it was
    admitted, with the same changes of limits (rescaled at the same instants)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.ops: list[tuple[str, int, int]] = []  # ("take", at, job) | ("limit", at, new limit)
        self.counted: dict[int, int] = {}  # job -> tokens: reserved until it settles, then used

    def take(self, job: int, at_us: int, tokens: int) -> None:
        self.ops.append(("take", at_us, job))
        self.counted[job] = tokens

    def limit(self, at_us: int, limit: int) -> None:
        self.ops.append(("limit", at_us, limit))

    def remaining(self, now_us: int, limit: int | None = None) -> int:
        """What the bucket holds at ``now_us``, read at ``limit`` (the limit that applies then: a
        bucket a redeploy left in the old scale is converted for the reading)."""
        bucket, tat = self.bucket, None
        for kind, at_us, value in self.ops:
            if kind == "take":
                tat = max(tat or at_us, at_us) + bucket.cost_us(self.counted[value])
            elif value != bucket.limit:
                tat = bucket.rescaled(tat, at_us, value) or tat
                bucket = bucket._replace(limit=value)
        if limit is not None and limit != bucket.limit:
            tat = bucket.rescaled(tat, now_us, limit) or tat
            bucket = bucket._replace(limit=limit)
        return bucket.remaining(tat, now_us)

    @property
    def limit_now(self) -> int:
        """The limit of the scale the replayed bucket is in after its last op."""
        return next((value for kind, _, value in reversed(self.ops) if kind == "limit"), self.bucket.limit)


def test_jobs_reserved_together_and_ended_in_order_get_back_what_is_queued_behind_the_others() -> None:
    """A tester's 16 concurrent 12,000-token jobs, cancelled after 30 s having used little, left the
    per-minute bucket 54,082 tokens short of what it would hold had they reserved only what they
    used: each refund was capped at what of its reservation had not refilled since its own take,
    though the bucket refills its whole backlog first and each was queued behind the ones before."""
    minute = RateLimiter.buckets(DEFAULTS)[0]  # 200,000 a minute

    def settled_in_order(used: int, *, placed: bool = True) -> tuple[int, int]:
        clock = Clock()
        world = Bucketed(DEFAULTS, clock)
        reservations = [world.admit(12_000) for _ in range(16)]
        assert world.remaining() == 200_000 - 192_000
        clock.now += 30  # 100,000 tokens refill
        for reservation in reservations:
            world.settle(reservation if placed else reservation._replace(places=()), used)
        taken_at = reservations[0].reserved_at_ms * 1000
        return world.remaining(), exact_remaining(minute, [(taken_at, used)] * 16, clock.ms() * 1000)

    # Cancelled before their first token: exactly what the bucket would hold (it is whole again),
    # where the count from each job's own take gave nothing back and left it 92,000 short.
    assert settled_in_order(0) == (200_000, 200_000)
    assert settled_in_order(0, placed=False) == (108_000, 200_000)
    # 1,551 used each: the first eight jobs' places have passed (their 12,000 are counted as used,
    # the bucket refilling from the front), so 10,857 short of exact, not 92,000.
    assert settled_in_order(1_551) == (189_143, 200_000)
    assert settled_in_order(1_551, placed=False) == (108_000, 200_000)


def test_refunds_read_together_and_written_in_order_all_stand() -> None:
    """Sixteen cancels at once (a client cancelling its batch): every settlement reads the refund
    counter before any is written. Held on the counter being unchanged, each write made every other
    one stale, and after five attempts they settled without their places (the bucket 92,000 short);
    held on the counter covering what each place still does, they all stand."""
    clock = Clock()
    world = Bucketed(DEFAULTS, clock)
    reservations = [world.admit(12_000) for _ in range(16)]
    clock.now += 30
    unused = (ModelUsage("sim-fast", 0, 0, 0),)
    read = [world.limiter.settle("job", reservation, unused) for reservation in reservations]
    for settlement in read:
        world.store._check(settlement)  # SettlementStale would fail the test
        world.store._settle(settlement)
    assert world.remaining() == 200_000


@pytest.mark.parametrize("seed", range(40))
def test_a_refund_among_other_jobs_never_grants_more_than_the_limit(seed: int) -> None:
    """Jobs admitted, settled in any order with any use (under, at or over what they reserved) and
    time passing between: after every settlement the bucket holds at most what it would hold had
    each job reserved what it used (GCRA replayed), to the rounding of one token a job."""
    rng = random.Random(seed)
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=100)
    world = Bucketed(limits, clock)
    minute = RateLimiter.buckets(limits)[0]
    admitted: list[tuple[int, int]] = []  # (admitted at, tokens counted: reserved, then used)
    open_jobs: dict[int, Reservation] = {}
    for _ in range(60):
        clock.now += rng.choice([0, 0, 0.5, 2, 7, 20, 45])
        if open_jobs and rng.random() < 0.45:
            index = rng.choice(sorted(open_jobs))
            reservation = open_jobs.pop(index)
            used = rng.choice([0, reservation.tokens // 3, reservation.tokens, reservation.tokens + 40])
            world.settle(reservation, used)
            admitted[index] = (admitted[index][0], used)
            exact = exact_remaining(minute, admitted, clock.ms() * 1000)
            assert world.remaining() <= exact + len(admitted), (seed, world.remaining(), exact)
        else:
            tokens = rng.choice([50, 120, 300, 600])
            try:
                reservation = world.admit(tokens)
            except TokenLimitExceeded:
                continue
            open_jobs[len(admitted)] = reservation
            admitted.append((reservation.reserved_at_ms * 1000, tokens))


@pytest.mark.parametrize("seed", range(60))
def test_refunds_raced_by_other_jobs_and_changes_of_limits_never_grant_more_than_the_limit(seed: int) -> None:
    """As above, both buckets, and with whatever may land between a settlement's read and its write:
    other jobs' admissions and settlements (themselves raced in turn), time, and changes of the
    tenant's limits (raises, lowerings that forgive, back to the defaults) replayed at the same
    instants, and redeploys that change the defaults (replayed where the next take converts the
    bucket). After every settlement each bucket holds at most what the replay does."""
    from spool_core.limits.service import set_tenant_limits

    rng = random.Random(seed)
    clock = Clock()
    defaults = TenantLimits(tokens_per_minute=1_000, tokens_per_day=6_000, max_concurrent_jobs=100)
    world = Bucketed(defaults, clock)
    replays = [Replay(bucket) for bucket in RateLimiter.buckets(defaults)]
    open_jobs: dict[int, Reservation] = {}
    jobs = 0

    def admit() -> None:
        nonlocal jobs
        try:
            reservation = world.admit(rng.choice([50, 120, 300, 600]))
        except TokenLimitExceeded:
            return
        for replay, (_, limit, _) in zip(replays, reservation.buckets, strict=True):
            at_us = reservation.reserved_at_ms * 1000
            if limit != replay.limit_now:  # a bucket a redeploy left in the old scale: the take converted it
                replay.limit(at_us, limit)
            replay.take(jobs, at_us, reservation.tokens)
        open_jobs[jobs] = reservation
        jobs += 1

    def redeploy() -> None:
        """New defaults: nothing is rescaled until a take (or a change of the tenant's limits)."""
        nonlocal defaults
        defaults = rng.choice(
            [
                defaults._replace(tokens_per_minute=m, tokens_per_day=d)
                for m, d in ((1_000, 6_000), (250, 9_000), (5_000, 1_500))
            ]
        )
        world.limiter = RateLimiter(world.store, defaults, clock_ms=clock.ms)

    def change() -> None:
        limits = rng.choice(
            [
                None,
                defaults._replace(tokens_per_minute=3_000),
                defaults._replace(tokens_per_minute=400, tokens_per_day=2_000),
            ]
        )
        if limits is None and world.store.limits() is None:
            return  # on the defaults already: nothing changes (a bucket a redeploy left stays as it is)
        set_tenant_limits(world.store, limits, defaults=defaults, now=clock.ms())
        for replay, bucket in zip(replays, RateLimiter.buckets(limits or defaults), strict=True):
            replay.limit(clock.ms() * 1000, bucket.limit)

    def settle() -> None:
        if not open_jobs:
            return
        job = rng.choice(sorted(open_jobs))
        reservation = open_jobs.pop(job)
        used = rng.choice([0, reservation.tokens // 3, reservation.tokens, reservation.tokens + 40])
        for _ in range(rng.choice([0, 0, 1, 2])):  # what lands between its read and its write
            world.before_commit.append(
                rng.choice(
                    [admit, change, redeploy, lambda: setattr(clock, "now", clock.now + 5)]
                    + ([settle] if len(open_jobs) > 1 else [])
                )
            )
        world.settle(reservation, used)
        for replay in replays:
            replay.counted[job] = used
        now_us = clock.ms() * 1000
        applied = RateLimiter.buckets(world.limiter.limits(world.store.state(None, "x")))
        for replay, bucket in zip(replays, applied, strict=True):
            exact = replay.remaining(now_us, bucket.limit)
            assert world.remaining(replay.bucket.name) <= exact + jobs, (seed, replay.bucket.name, exact)

    for _ in range(80):
        clock.now += rng.choice([0, 0, 0.5, 2, 7, 20, 45])
        step = rng.random()
        if open_jobs and step < 0.45:
            settle()
        elif step < 0.52:
            change()
        elif step < 0.56:
            redeploy()
        else:
            admit()


def test_a_settlement_raced_by_a_change_of_limits_is_settled_again_on_the_scale_it_is_written_at() -> None:
    """A settlement read the limits, then wrote its bucket moves: a change that landed between the
    two (an operator's command in the job's last milliseconds) was converted at the scale the
    bucket had just left. Raised from 5,000 to 100,000 a day, a refund of 4,000 tokens at the old
    scale gave back 80,000 at the new one. Its write now holds on the bucket's scale version, and
    settled again it gives back 4,000 at the new scale (raised only since the take: see ``Place``)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    before = TenantLimits(tokens_per_minute=100_000, tokens_per_day=5_000, max_concurrent_jobs=4)
    world = Bucketed(DEFAULTS, clock)
    set_tenant_limits(world.store, before, defaults=DEFAULTS, now=clock.ms())
    reservation = world.admit(4_500)
    assert world.remaining("day") == 500
    raised = before._replace(tokens_per_day=100_000)
    world.before_commit.append(
        lambda: set_tenant_limits(world.store, raised, defaults=DEFAULTS, now=clock.ms())
    )
    world.settle(reservation, 500)
    assert len(world.attempts) == 2 and world.store.limits() == raised
    assert world.remaining("day") == 100_000 - 500  # 4,000 back as tokens: not 80,000 (all 100,000)


def test_a_raise_and_a_return_between_a_settlements_read_and_write_is_seen() -> None:
    """The limits' values were the same at the settlement's read and at its write: raised to 6,000 a
    minute and set back meanwhile, with a job of 1,000 admitted at the raised rate. The return's
    rescale capped the bucket's backlog at one period, and the refund computed before gave back 500
    tokens of a minute the new job holds whole."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    world.admit(500)
    reservation = world.admit(500)
    clock.now += 10

    def raise_and_return() -> None:
        set_tenant_limits(
            world.store, limits._replace(tokens_per_minute=6_000), defaults=limits, now=clock.ms()
        )
        clock.now += 10
        world.admit(1_000)
        set_tenant_limits(world.store, None, defaults=limits, now=clock.ms())

    world.before_commit.append(raise_and_return)
    world.settle(reservation, 0)
    assert len(world.attempts) == 2
    assert world.remaining() == 0  # exact: the 1,000 admitted at the raised rate fill the minute


def test_no_refund_of_a_reservation_taken_before_its_buckets_limit_was_lowered() -> None:
    """The count from the reservation's own take refilled it at the faster of two limits, the one it
    was taken at and the one now, and a lowering's rescale forgives what is outstanding past one
    period: a raise in between refilled faster than either (1,000 left where 700 are), a lowering
    forgave half the backlog that the refund then gave back again (500 left where none are)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    raised = Bucketed(limits, clock)
    reservation = raised.admit(600)
    set_tenant_limits(raised.store, limits._replace(tokens_per_minute=2_000), defaults=limits, now=clock.ms())
    clock.now += 18  # 600 refill at 2,000 a minute: the bucket is whole
    set_tenant_limits(raised.store, None, defaults=limits, now=clock.ms())
    raised.admit(300)
    raised.settle(reservation, 0)
    assert raised.remaining() == 700
    lowered = Bucketed(limits, clock)
    reservation = lowered.admit(500)
    lowered.admit(500)
    set_tenant_limits(lowered.store, limits._replace(tokens_per_minute=500), defaults=limits, now=clock.ms())
    lowered.settle(reservation, 0)
    assert lowered.remaining() == 0


def test_a_refund_counts_the_refunds_of_the_jobs_ahead_of_it_since_its_take() -> None:
    """The jobs ahead of a reservation that were refunded since moved it forward in the bucket's
    queue of time: what of it is still ahead of now is that much less. Counted from where it was
    taken, the refund below gave back 433 tokens the bucket had refilled already."""
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    ahead, reservation = world.admit(500), world.admit(500)  # 0-30 s and 30-60 s of the minute
    world.settle(ahead, 0)  # the reservation now holds 0-30 s
    clock.now += 25
    later = world.admit(500)
    clock.now += 1
    world.settle(reservation, 0)
    taken = [
        (ahead.reserved_at_ms * 1000, 0),
        (reservation.reserved_at_ms * 1000, 0),
        (later.reserved_at_ms * 1000, 500),
    ]
    exact = exact_remaining(RateLimiter.buckets(limits)[0], taken, clock.ms() * 1000)
    assert exact == 516 and world.remaining() == 500  # never more than exact: 4 s of it refunded


def test_a_refund_whose_counter_moved_before_it_was_written_is_settled_again() -> None:
    """A refund that counted on the bucket's refund counter is written only if the counter has not
    moved since it was read: another refund landing in between is counted by a second attempt."""
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    world.admit(333)  # 20 s, ahead of the two below
    reservation, behind = world.admit(500), world.admit(166)  # 20-50 s, 50-60 s
    clock.now += 25
    world.before_commit.append(lambda: world.settle(behind, 0))
    world.settle(reservation, 0)
    first, _, second = world.attempts  # the one behind it settled in between
    assert (
        dict(first.refund_bounds)["minute"] == 0 and dict(first.bucket_deltas)["minute"] == -24_980_000
    )  # 416 tokens
    assert dict(second.refund_bounds)["minute"] == 9_960_000  # the refund behind it, 10 s, counted
    assert dict(second.bucket_deltas)["minute"] == -15_020_000
    assert world.store._usage["bucket#minute"]["refunded_us"] == 9_960_000 + 15_020_000


def test_a_job_admitted_between_a_refunds_read_and_its_write_makes_it_settle_again() -> None:
    """A refund capped by time was computed at its read: a job admitted before its write queued
    behind the time it gave back, part of which had refilled between the two (30 s refunded, 29 of
    them past at the write: 583 tokens left where 100 are)."""
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    ahead, reservation = world.admit(400), world.admit(600)  # 0-24 s, 24-60 s
    clock.now += 30

    def later_a_job() -> None:
        clock.now += 29
        world.admit(900)

    world.before_commit.append(later_a_job)
    world.settle(reservation, 0)
    assert len(world.attempts) == 2  # the first write refused: a take landed since its read
    taken = [(ahead.reserved_at_ms * 1000, 400), (reservation.reserved_at_ms * 1000, 0)]
    taken.append(((clock.ms() * 1000), 900))
    assert (
        world.remaining() <= exact_remaining(RateLimiter.buckets(limits)[0], taken, clock.ms() * 1000) == 100
    )


def test_a_debt_run_up_while_the_bucket_refilled_is_charged_from_now_once() -> None:
    """A debt added to a TAT in the past was partly refilled before it was run up; charged from now
    it holds on the TAT it read, so a job admitted meanwhile (restarting the bucket) does not make
    the tenant pay the idle time too."""
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    reservation = world.admit(100)
    clock.now += 120  # the bucket is whole again
    world.settle(reservation, 200)  # 100 over: charged from now
    assert world.remaining() == 900
    clock.now += 120
    other = Bucketed(limits, clock)
    late = other.admit(100)
    clock.now += 120
    other.before_commit.append(lambda: other.admit(100))  # restarts the bucket between read and write
    other.settle(late, 200)
    assert len(other.attempts) == 2 and other.remaining() == 800  # 100 taken, 100 of debt: no idle time


def test_a_reservation_from_before_places_gets_no_refund_after_a_lowering() -> None:
    """Jobs admitted before places were kept count from zero: a lowering counted since was after
    their take (lowered to 500 and raised back, the old count refunded what the lowering forgave)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=1_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    first = world.admit(500)._replace(places=())
    world.admit(500)
    set_tenant_limits(world.store, limits._replace(tokens_per_minute=500), defaults=limits, now=clock.ms())
    set_tenant_limits(world.store, None, defaults=limits, now=clock.ms())
    world.settle(first, 0)
    assert world.remaining() == 500


def test_a_redeploy_that_lowers_the_defaults_refunds_nothing_reserved_before_it() -> None:
    """A redeploy rescales nothing: a reservation taken at 100,000 a minute and refunded at 1,000
    gave back 1,200 s for the 12 s it took, the whole bucket each time."""
    clock = Clock()
    before = TenantLimits(tokens_per_minute=100_000, tokens_per_day=10_000_000, max_concurrent_jobs=10)
    world = Bucketed(before, clock)
    world.admit(40_000)
    reservation = world.admit(20_000)
    world.limiter = RateLimiter(world.store, before._replace(tokens_per_minute=1_000), clock_ms=clock.ms)
    held = world.remaining()
    world.settle(reservation, 0)
    assert world.remaining() == held  # not the whole 1,000


def test_a_bucket_keeps_the_limit_its_time_is_in_and_the_next_take_after_a_redeploy_converts_it() -> None:
    """A redeploy that changes the deployment's defaults rescales nothing when it happens: 20,000 of
    100,000 a minute used, then the defaults lowered to 1,000, the bucket read at the new limit said
    800 remaining where nothing is (the 20,000 outstanding are a minute's debt at 1,000, as a change
    of a tenant's own limits carries them over). Each bucket records the limit its TAT is in, so it
    is read in its own scale, and the next take converts it, counted as a rescale."""
    clock = Clock()
    before = TenantLimits(tokens_per_minute=100_000, tokens_per_day=10_000_000, max_concurrent_jobs=10)
    world = Bucketed(before, clock)
    world.admit(20_000)
    assert world.store.state(None, "x").scales == {"minute": 100_000, "day": 10_000_000}
    world.limiter = RateLimiter(world.store, before._replace(tokens_per_minute=1_000), clock_ms=clock.ms)
    assert world.remaining() == 0  # read at 1,000 in its own scale's time: 800
    with pytest.raises(TokenLimitExceeded) as refused:
        world.admit(100)
    # It refills at the old rate until a take converts it: the 20,000 are 12 s there, and 100 fit
    # once 900 are left, 0.54 s before (converted at the new rate, the wait said 6 s, refused again).
    assert refused.value.details["tokens_remaining"] == 0 and refused.value.retry_after_seconds == 11.46
    clock.now += refused.value.retry_after_seconds
    world.admit(100)  # the take converts the bucket
    usage = world.store.state(None, "x")
    assert usage.scales["minute"] == 1_000 and usage.rescales["minute"] == usage.lowerings["minute"] == 1
    assert world.remaining() == 0
    clock.now += 30  # from now on it refills at 1,000 a minute
    assert world.remaining() == 500


def test_a_raise_by_a_redeploy_gives_the_bucket_the_new_limit_at_once_and_refunds_at_the_old_scale() -> None:
    """Raised from 100,000 to 200,000 a minute by a redeploy with 60,000 reserved: read at the new
    limit the bucket said 80,000 remaining (36 s of its time), where 140,000 are; and a reservation's
    refund, converted at the new limit, gave back half of what it took."""
    clock = Clock()
    before = TenantLimits(tokens_per_minute=100_000, tokens_per_day=10_000_000, max_concurrent_jobs=10)
    world = Bucketed(before, clock)
    world.admit(40_000)
    reservation = world.admit(20_000)
    world.limiter = RateLimiter(world.store, before._replace(tokens_per_minute=200_000), clock_ms=clock.ms)
    assert world.remaining() == 140_000
    world.settle(reservation, 0)  # at the scale it was taken at: the bucket's, until a take converts it
    assert world.remaining() == 160_000
    world.admit(150_000)  # fits: the take converts the bucket
    assert world.remaining() == 10_000 and world.store.state(None, "x").scales["minute"] == 200_000


def test_a_raise_that_caps_what_is_outstanding_forgives_as_a_lowering_does() -> None:
    """A rescale keeps a debt of one period at most, so a raise can forgive too: at 1,000 a minute,
    jobs reserving 500, 400 and 100, the last using 700, left 1,600 outstanding; raised to 1,200, a
    minute's debt. A raise counted as no lowering, so the first job, refunded unused, gave back its
    500 on top of what the raise had forgiven: 500 remaining where the replay holds 100. A rescale
    that caps counts as a lowering (outside review)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    limits = TenantLimits(tokens_per_minute=1_000, tokens_per_day=10_000_000, max_concurrent_jobs=10)
    world = Bucketed(limits, clock)
    set_tenant_limits(world.store, limits, defaults=DEFAULTS, now=clock.ms())
    first = world.admit(500)
    world.admit(400)
    world.settle(world.admit(100), 700)
    lowerings = world.store.state(None, "x").lowerings["minute"]
    set_tenant_limits(
        world.store, limits._replace(tokens_per_minute=1_200), defaults=DEFAULTS, now=clock.ms()
    )
    assert world.store.state(None, "x").lowerings["minute"] == lowerings + 1
    world.settle(first, 0)
    assert world.remaining() == 0  # as the replay, at most: 1,100 outstanding at 1,200 a minute
    assert Bucket("minute", 1_000, MINUTE_US).forgives(NOW_US + 96_000_000, NOW_US, 1_200)
    assert not Bucket("minute", 1_000, MINUTE_US).forgives(NOW_US + 60_000_000, NOW_US, 1_000)


def test_a_change_of_limits_holds_on_the_buckets_it_does_not_move() -> None:
    """A change held only on the buckets it moved: one read as already in the new scale (a redeploy
    had raised the defaults from 1,000 to 100,000 a minute, the tenant pinned back at 1,000) was
    converted by an admission between the change's read and its write, and left at 100,000's scale
    under the tenant's 1,000: 37 s later it held 1,000 where 616 are. The change holds on every
    bucket's scale version, and settles again (outside review)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    before = TenantLimits(tokens_per_minute=1_000, tokens_per_day=10_000_000, max_concurrent_jobs=10)
    world = Bucketed(before, clock)
    world.admit(900)
    redeployed = before._replace(tokens_per_minute=100_000)
    real = world.store.change_limits
    tries = []

    def admitted_meanwhile(*args: Any) -> bool:
        if not tries:
            world.limiter = RateLimiter(world.store, redeployed, clock_ms=clock.ms)
            world.admit(60_000)  # converts the minute to 100,000's scale
        tries.append(args)
        return real(*args)

    world.store.change_limits = admitted_meanwhile  # type: ignore[method-assign]
    set_tenant_limits(world.store, before, defaults=redeployed, now=clock.ms())
    assert len(tries) == 2  # refused once, then moved from the scale it was in
    usage = world.store.state(None, "x")
    assert usage.limits == before and usage.scales["minute"] == 1_000
    clock.now += 37
    assert world.remaining() == 616


def test_a_scale_recorded_before_older_code_changed_the_limits_is_not_trusted() -> None:
    """Code from before scales were kept (a rollback, an operator's older ``spool`` CLI) changes a
    tenant's limits without recording one: raised from 1,000 to 100,000 a minute that way, with
    90,500 then taken at 100,000, the stale scale read the bucket as 99,095 remaining where 9,500
    are. A scale counts only at the version it was recorded at (outside review)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    world = Bucketed(DEFAULTS, clock)
    own = DEFAULTS._replace(tokens_per_minute=1_000)
    set_tenant_limits(world.store, own, defaults=DEFAULTS, now=clock.ms())
    world.admit(500)
    bucket = world.store._usage["bucket#minute"]
    assert (bucket["scale"], bucket["scale_at"], bucket["rescales"]) == (1_000, 1, 1)
    # the older code's change: the TAT carried over, the version counted, no scale recorded
    raised = own._replace(tokens_per_minute=100_000)
    bucket["tat_us"] = Bucket("minute", 1_000, MINUTE_US).rescaled(
        bucket["tat_us"], clock.ms() * 1000, 100_000
    )
    bucket["rescales"] += 1
    world.store._set_limits(raised)
    bucket["tat_us"] += Bucket("minute", 100_000, MINUTE_US).cost_us(90_000)  # and its take
    assert world.store.state(None, "x").scales == {"day": DEFAULTS.tokens_per_day}
    assert world.remaining() == 9_500
    with pytest.raises(TokenLimitExceeded):
        world.admit(90_000)


@pytest.mark.parametrize(
    ("before", "after", "used", "tokens", "wait"),
    [(100_000, 1_000, 20_000, 100, 11.46), (1_000, 100_000, 1_000, 99_500, 30.0)],
    ids=["lowered", "raised"],
)
def test_a_refusal_from_a_bucket_in_the_old_scale_says_when_the_job_fits(
    before: int, after: int, used: int, tokens: int, wait: float
) -> None:
    """A bucket a redeploy left in the old scale refills at the old rate until a take converts it,
    and a refusal converts nothing: its wait, counted at the new rate, was wrong both ways (lowered,
    6 s where 11.46 are, refused again; raised, 1 s thirty times over). Counted in the bucket's
    scale, the wait it gives is the one (outside review)."""
    clock = Clock()
    world = Bucketed(DEFAULTS._replace(tokens_per_minute=before), clock)
    world.admit(used)
    world.limiter = RateLimiter(world.store, DEFAULTS._replace(tokens_per_minute=after), clock_ms=clock.ms)
    with pytest.raises(TokenLimitExceeded) as refused:
        world.admit(tokens)
    assert refused.value.retry_after_seconds == wait
    clock.now += wait - 0.01
    with pytest.raises(TokenLimitExceeded):
        world.admit(tokens)
    clock.now += 0.01
    world.admit(tokens)


def test_a_scale_recorded_without_its_version_is_the_buckets() -> None:
    """8c366ef-7f87346 recorded a scale at every take and rescale, without the version it was at: on
    a bucket rescaled since (a tenant once on limits of its own), reading such a scale as stale read
    the TAT at the limits that apply: after the defaults were lowered from 100,000 to 1,000 a minute
    by a redeploy, 800 remaining where the 20,000 used leave none (third review)."""
    clock = Clock()
    before = DEFAULTS._replace(tokens_per_minute=100_000)
    world = Bucketed(before, clock)
    world.admit(20_000)
    minute = world.store._usage["bucket#minute"]
    minute["rescales"] = 1  # rescaled once before; 7f87346 wrote no scale_at
    minute["scale"] = 100_000
    del minute["scale_at"]
    world.limiter = RateLimiter(world.store, before._replace(tokens_per_minute=1_000), clock_ms=clock.ms)
    assert world.store.state(None, "x").scales["minute"] == 100_000
    assert world.remaining() == 0


def test_a_refusal_from_a_bucket_in_the_old_scale_is_not_refused_again_when_it_said() -> None:
    """The wait counted the converted backlog and the cost unrounded, where the converting take
    rounds both up: 6,000 a minute used up, raised to 9,000 by a redeploy, a job of 4,000 was told
    Retry-After: 10 and refused again 10 s later, 1 us short (third review)."""
    clock = Clock()
    before = DEFAULTS._replace(tokens_per_minute=6_000)
    world = Bucketed(before, clock)
    world.admit(6_000)
    world.limiter = RateLimiter(world.store, before._replace(tokens_per_minute=9_000), clock_ms=clock.ms)
    with pytest.raises(TokenLimitExceeded) as refused:
        world.admit(4_000)
    assert refused.value.headers["Retry-After"] == "11"  # it fits from 10.000001 s on
    clock.now += 10
    with pytest.raises(TokenLimitExceeded):
        world.admit(4_000)
    clock.now += 0.001  # the limiter's clock counts milliseconds
    world.admit(4_000)


def test_a_change_of_limits_that_lost_a_race_converts_at_the_moment_of_its_next_read() -> None:
    """A raise from 1,000 to 1,000,000 a minute with the minute used up, which lost a race to an
    admission 0.2 s later, was converted at the moment before its first read: those 0.2 s counted as
    refilled at 1,000,000 a minute, though the admission in them was taken at 1,000 (third review)."""
    from spool_core.limits.service import set_tenant_limits

    clock = Clock()
    limits = DEFAULTS._replace(tokens_per_minute=1_000)
    world = Bucketed(limits, clock)
    set_tenant_limits(world.store, limits, defaults=limits, clock=clock.ms)
    world.admit(1_000)
    replay = Replay(Bucket("minute", 1_000, MINUTE_US))
    replay.take(0, clock.ms() * 1000, 1_000)
    real, tries = world.store.change_limits, []

    def raced(*args: Any) -> bool:
        if not tries:
            clock.now += 0.2
            world.admit(3)  # refilled at 1,000 a minute meanwhile, taken at that limit
            replay.take(1, clock.ms() * 1000, 3)
        tries.append(args)
        return real(*args)

    world.store.change_limits = raced  # type: ignore[method-assign]
    set_tenant_limits(
        world.store, limits._replace(tokens_per_minute=1_000_000), defaults=limits, clock=clock.ms
    )
    assert len(tries) == 2
    replay.limit(clock.ms() * 1000, 1_000_000)
    assert world.remaining() <= replay.remaining(clock.ms() * 1000)


def test_reset_at_is_when_the_job_fits_rounded_up() -> None:
    """reset_at kept milliseconds by dropping the rest: 9,000 a minute used up, a job of 1 fits
    6,667 us later and reset_at said 6 ms; a client waiting until then was refused (third review)."""
    from datetime import datetime

    clock = Clock()
    world = Bucketed(DEFAULTS._replace(tokens_per_minute=9_000), clock)
    world.admit(9_000)
    with pytest.raises(TokenLimitExceeded) as refused:
        world.admit(1)
    clock.now = datetime.fromisoformat(refused.value.details["reset_at"]).timestamp()
    world.admit(1)
