"""The rate limiter's logic: estimate a job, decide whether it fits, plan the conditional writes that
reserve it, and settle it against what it used. It never writes itself: admission commits the plan
with the job in one transaction, and the job's final write commits the settlement, so a reservation
never exists without its job and is settled exactly once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Protocol, TypeVar

from spool_core.clock import from_epoch, rfc3339
from spool_core.errors import Conflict, InvalidRequest
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import (
    DAY_US,
    MINUTE_US,
    Bucket,
    Estimate,
    ModelUsage,
    Place,
    Reading,
    Rescale,
    Reservation,
    ReservationPlan,
    Settlement,
    SettlementStale,
    TenantLimits,
    UsageState,
)
from spool_core.units import now_ms, usd, usd_text

T = TypeVar("T")
DEFAULT_USAGE_DAYS = 7
SETTLE_ATTEMPTS = 5  # of settling against buckets that moved meanwhile (the last refunds nothing)
# A refund within this of its cap holds on no take having landed since its read (a refund further
# from its cap stands if its write lands within this of its read).
SETTLE_SLACK_US = 1_000_000
MAX_USAGE_DAYS = 366  # one query reads one rollup per model and day


@dataclass
class ModelStats:
    """What a tenant's past jobs on one model taught: the correction of its input estimate."""

    correction_milli: int = 1000
    samples: int = 0
    version: int = 0


class UsageStore(Protocol):
    """The tenant's usage partition, for everything but admission and settlement (which the job
    store commits together with the job)."""

    def state(self, model_id: str | None, day: str) -> UsageState:
        """Limits, buckets, running jobs, today's commitments and the model's statistics: one read."""

    def stats(self, model_id: str) -> ModelStats: ...

    def save_stats(self, model_id: str, stats: ModelStats, expected_version: int) -> bool: ...

    def rollups(self, since: str, until: str) -> list[dict[str, Any]]: ...

    def limits(self) -> TenantLimits | None: ...

    def bucket_state(self) -> UsageState:
        """The limits and the buckets (TATs, refund counters, scale versions): what a settlement
        reads, in one request."""

    def count_spend(self, day: str) -> None:
        """Make ``day``'s budget commitments hold what was spent that day and they do not hold yet:
        the settled spend (the rollups) beyond the part budgeted jobs settled into them."""

    def change_limits(
        self,
        previous: TenantLimits | None,
        limits: TenantLimits | None,
        moves: Sequence[Rescale],
        versions: Mapping[str, int],
    ) -> bool:
        """Set the tenant's own limits (None: remove them, the deployment's defaults apply) and, for
        each of ``moves`` (a bucket whose scale changes), record its new scale, count the change (and
        a lowering), and set its TAT when something outstanding is carried over, all or none: if the
        token limits are still ``previous`` (None: the tenant has none of its own), each moved
        bucket's TAT is still the one seen, and each bucket's scale version is still its entry in
        ``versions``. Whether they were."""


RESCALE_ATTEMPTS = 5  # of moving a bucket's TAT against admissions and settlements meanwhile


def set_tenant_limits(
    store: UsageStore,
    limits: TenantLimits | None,
    *,
    defaults: TenantLimits,
    now: int | None = None,
    clock: Callable[[], int] = now_ms,
) -> None:
    """A tenant's own limits, or (``limits`` None) back to the deployment's ``defaults``.

    A daily budget that starts now counts what the tenant already spent today: a job admitted
    without a budget adds nothing to the day's commitments, so a budget set after $3 of spend would
    otherwise allow its whole amount again. Counted before the budget applies, and added, never set:
    a reservation made meanwhile is kept. A token limit that changes keeps the tokens outstanding in
    its bucket (``Bucket.rescaled``), from the scale the bucket is in (the limit it records) to the
    limits that apply after, the defaults included. A change of the defaults themselves (a redeploy)
    rescales nothing when it happens: a bucket is read in the scale it records, converted by its next
    take (``Bucket.take_rescaled``), and a settlement moves it in that scale (``RateLimiter.settle``).

    Each attempt converts at the moment after its read (``clock``; ``now``: a fixed instant): a
    moment taken before an attempt that lost a race counted the time since as refilled at the new
    limit, though the admissions in it were taken at the old one."""
    day = utc_day(clock() if now is None else now)
    state = store.state(None, day)
    if limits is None and state.limits is None:
        return  # on the defaults already
    if (limits or defaults).daily_budget_nanos is not None and (
        state.limits or defaults
    ).daily_budget_nanos is None:
        store.count_spend(day)
    # The limits and the buckets they rescale in one write: a change applied in part and run again
    # would rescale a bucket twice.
    for _ in range(RESCALE_ATTEMPTS):
        moment_us, moves = (clock() if now is None else now) * 1000, []
        before, after = RateLimiter.buckets(state.limits or defaults), RateLimiter.buckets(limits or defaults)
        for applied, new in zip(before, after, strict=True):
            old = RateLimiter._reading(state, applied).in_scale  # its TAT's scale (a redeploy's defaults)
            if old.limit != new.limit:  # counted even with nothing outstanding: see ``Place``
                seen = state.tats.get(old.name)
                tat = old.rescaled(seen, moment_us, new.limit)
                version = state.rescales.get(old.name, 0)
                # a raise that caps what is outstanding forgives too: as a lowering (see ``Place``)
                lowered = new.limit < old.limit or old.forgives(seen, moment_us, new.limit)
                moves.append(Rescale(old.name, seen, tat, new.limit, lowered, version))
        # ...holding on every bucket's scale version, moved or not: a bucket read as already in the
        # new scale could be converted by a take meanwhile (a redeploy's) and be left in another.
        versions = {bucket.name: state.rescales.get(bucket.name, 0) for bucket in after}
        if store.change_limits(state.limits, limits, moves, versions):
            return
        state = store.state(None, day)
    raise Conflict(
        "Could not carry the tenant's buckets over to its new limits: jobs kept starting meanwhile",
        suggestions=["Run the command again"],
    )


def utc_day(moment_ms: int) -> str:
    return from_epoch(moment_ms / 1000).strftime("%Y-%m-%d")


def next_midnight_ms(moment_ms: int) -> int:
    day = from_epoch(moment_ms / 1000).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((day + timedelta(days=1)).timestamp() * 1000)


class RateLimiter:
    def __init__(
        self,
        store: UsageStore,
        defaults: TenantLimits,
        *,
        clock_ms: Callable[[], int] = now_ms,
        correction_bounds_milli: tuple[int, int] = (500, 2000),
        learning_rate: float = 0.2,
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._clock_ms = clock_ms
        self.correction_bounds_milli = correction_bounds_milli
        self.learning_rate = learning_rate

    def now_ms(self) -> int:
        return self._clock_ms()

    # ------------------------------------------------------------------ limits
    def limits(self, state: UsageState) -> TenantLimits:
        """The tenant's own limits (read at every admission, so a change applies at the next one),
        or the deployment's defaults."""
        return state.limits or self._defaults

    @staticmethod
    def buckets(limits: TenantLimits) -> tuple[Bucket, Bucket]:
        return Bucket("minute", limits.tokens_per_minute, MINUTE_US), Bucket(
            "day", limits.tokens_per_day, DAY_US
        )

    @staticmethod
    def _reading(state: UsageState, bucket: Bucket) -> Reading:
        """``bucket`` (at the limit that applies) as read, in the scale its TAT is in
        (``UsageState.scales``; the limit that applies for a bucket that records none)."""
        return Reading(bucket, state.scales.get(bucket.name, bucket.limit), state.tats.get(bucket.name))

    # ------------------------------------------------------------------ estimate
    def estimate(self, state: UsageState, input_raw: int, max_tokens: int) -> Estimate:
        """The input as counted, corrected by what this tenant's jobs on the model reported, and the
        whole ``max_tokens`` of output: a job can use all of it, and the limits and the daily budget
        are caps (a reservation of typical output let a tenant trained on short answers run 26 times
        its budget, and 67 times its daily tokens, with a few large ``max_tokens``)."""
        input_tokens = -(-input_raw * state.correction_milli // 1000)
        return Estimate(
            input_raw=input_raw,
            correction_milli=state.correction_milli,
            input_tokens=input_tokens,
            output_tokens=max_tokens,
        )

    # ------------------------------------------------------------------ reserve
    def plan(self, state: UsageState, tokens: int, cost_nanos: int) -> ReservationPlan:
        """The writes that reserve a job's slot, tokens and cost against the state just read, or the
        matching 429 (nothing is written for a refusal)."""
        now = self.now_ms()
        now_us = now * 1000
        limits = self.limits(state)
        if state.running >= limits.max_concurrent_jobs:
            raise TooManyConcurrentJobs(
                f"{state.running} jobs are queued or running; the limit is {limits.max_concurrent_jobs}",
                retry_after_seconds=1,
                details={"running": state.running, "limit": limits.max_concurrent_jobs},
            )
        takes, refusals, places = [], [], []
        for bucket in self.buckets(limits):
            reading = self._reading(state, bucket)
            tat = reading.tat
            version = state.rescales.get(bucket.name, 0)
            if reading.scale == bucket.limit:
                take = bucket.take(tat, now_us, tokens, version)
            else:  # its TAT is in the scale of defaults a redeploy changed since: converted first
                take, tat = bucket.take_rescaled(reading.scale, tat, now_us, tokens, version)
            if take is None:
                refusals.append(self._token_limit(reading, tokens, now_us))
                continue
            takes.append(take)
            # The TAT after the take, at least: an advance lands on the TAT as it is then, which
            # takes since the read only raised (refunds since the read are counted from the
            # counter read with it, a rescale since ends the place's use: see ``Place``).
            start = now_us if take.kind == "restart" or tat is None else tat
            rescale = take.rescale  # counted by the take: the place is in the scale after it
            places.append(
                Place(
                    bucket.name,
                    start + take.cost_us,
                    state.refunded.get(bucket.name, 0),
                    version + (rescale is not None),
                    state.lowerings.get(bucket.name, 0) + (rescale is not None and rescale.lowered),
                )
            )
        if refusals:
            # The bucket that decides: one the job never fits, else the one with the longest wait (a
            # client that waits for the first to have room would be refused by the other).
            raise max(refusals, key=_deciding)
        room = None
        budget = limits.daily_budget_nanos
        if budget is not None:
            room = budget - cost_nanos
            if room < 0 or state.committed_nanos > room:
                raise self._budget_exceeded(budget, state.committed_nanos, cost_nanos, now)
        reservation = Reservation(
            tokens=tokens,
            cost_nanos=cost_nanos,
            day=utc_day(now),
            reserved_at_ms=now,
            buckets=tuple((b.name, b.limit, b.period_us) for b in self.buckets(limits)),
            budgeted=budget is not None,
            places=tuple(places),
        )
        return ReservationPlan(reservation, tuple(takes), limits.max_concurrent_jobs, room, state.limits)

    def _token_limit(self, reading: Reading, tokens: int, now_us: int) -> TokenLimitExceeded:
        bucket = reading.bucket
        remaining = reading.remaining(now_us)
        per = "minute" if bucket.period_us == MINUTE_US else "day"
        message = f"This job needs {tokens:,} tokens; {remaining:,} of {bucket.limit:,} per {per} remain"
        suggestions = None
        if tokens > bucket.limit:
            # It never fits, however long the caller waits: the reset named is when the bucket is
            # whole again (the buckets refill continuously), and the suggestions say what would fit.
            reset_us = now_us + reading.reset_us(now_us)
            message = (
                f"This job needs {tokens:,} tokens, more than the whole limit of {bucket.limit:,}"
                f" per {per}: waiting will not help"
            )
            suggestions = [
                f"Lower max_tokens or send less context: at most {bucket.limit:,} tokens fit in the"
                f" per-{per} limit",
                "Ask for a higher limit",
            ]
        else:
            reset_us = reading.available_at(now_us, tokens)
        error = TokenLimitExceeded(
            message,
            retry_after_seconds=max(1.0, (reset_us - now_us) / 1e6),
            details={
                "tokens_requested": tokens,
                "tokens_remaining": remaining,
                "limit": bucket.limit,
                "window": per,
                # rounded up: a client that waits until then finds the room (rfc3339 keeps milliseconds)
                "reset_at": rfc3339(from_epoch(-(-reset_us // 1000) / 1000)),
            },
            suggestions=suggestions,
        )
        if tokens > bucket.limit:
            # The contract's Retry-After is still sent (when the bucket is whole again); this tells
            # clients that retry by themselves (OpenAI SDKs, Spool's) that a retry cannot succeed.
            error.headers["x-should-retry"] = "false"
        return error

    @staticmethod
    def _budget_exceeded(budget: int, committed: int, cost: int, now: int) -> BudgetExceeded:
        reset = next_midnight_ms(now)
        message = (
            f"Today's spend ({usd_text(committed)} USD) plus this job's estimate ({usd_text(cost)} USD)"
            f" exceeds the daily budget ({usd_text(budget)} USD)"
        )
        suggestions = None
        if cost > budget:
            # It never fits, whatever the day's spend: a retry after midnight is refused again. As for
            # a job over a whole token limit, Retry-After stays (the contract's), and x-should-retry
            # tells clients that retry by themselves not to.
            message = (
                f"This job's estimate ({usd_text(cost)} USD) is more than the whole daily budget"
                f" ({usd_text(budget)} USD): waiting will not help"
            )
            suggestions = [
                "Lower max_tokens (the estimate prices all of it) or send less context",
                "Use a cheaper model (GET /v1/models lists prices)",
                "Ask for a higher daily budget",
            ]
        error = BudgetExceeded(
            message,
            retry_after_seconds=(reset - now) / 1000,
            details={
                "budget_usd": usd(budget),
                "spent_usd": usd(committed),
                "estimated_cost_usd": usd(cost),
                "reset_at": rfc3339(from_epoch(reset / 1000)),
            },
            suggestions=suggestions,
        )
        if cost > budget:
            error.headers["x-should-retry"] = "false"
        return error

    # ------------------------------------------------------------------ settle / learn
    def settle(
        self,
        job_id: str,
        reservation: Reservation | None,
        usage: Sequence[ModelUsage],
        *,
        refunds: bool = True,
    ) -> Settlement:
        """Replace a reservation with what the job used. Each bucket's TAT moves by the difference
        (a charge may leave the bucket in debt); an unused part is refunded only as far as the
        reservation is still outstanding: the bucket refills as time passes, and a refund of what
        has refilled since would grant more than the limit (900 of 1,000 a minute reserved, unused
        and refunded a minute later, let another 900 in beside the next reservation's 900).

        What is outstanding is at least what of the reservation has not refilled since its own take,
        whatever other jobs did. With others in the bucket before it, more is: GCRA refills the whole
        backlog in order, and the reservation's tokens were queued behind theirs (16 jobs reserving
        12,000 together and cancelled after 30 s were refunded nothing on the first count, the
        bucket 92,000 tokens short). That is counted too, from the reservation's ``Place``, on
        condition that the bucket's refund counter has not passed what the place still covers when
        the settlement is written (``settled`` settles again when it has). A refund capped by time
        also holds on no job having been admitted between its read and its write. ``refunds``
        False: none at all (the last attempt).

        The differences are in the scale each bucket's TAT is in (the limit it records, read from the
        same item as its scale version: the limits that apply for a bucket that records none), on
        condition that the bucket's scale has not changed when they are written (its scale version,
        ``rescales``): every change of a tenant's limits moves each bucket's TAT to the new limits'
        scale in the same write (``set_tenant_limits``), as the first take after a redeploy that
        changed the defaults does (``Bucket.take_rescaled``), and a
        settlement converted at the scale a bucket has left gave back 225 of 4,500 tokens after a
        lowering from 100,000 to 5,000 a day (or, after a raise and a return, a refund the rescales
        had forgiven already). A refund of a reservation taken before its bucket's limit was lowered
        is none."""
        now = self.now_ms()
        actual = sum(u.input_tokens + u.output_tokens for u in usage)
        cost = sum(u.cost_nanos for u in usage)
        if reservation is None:  # nothing was reserved
            return Settlement(job_id, tuple(usage), utc_day(now), (), None, release_slot=False)
        difference = actual - reservation.tokens
        state = self._store.bucket_state() if difference else UsageState()
        # Each bucket's moves in the scale its TAT is in: the limit it records (read with its scale
        # version, which the moves hold on), else the limits that apply.
        scales = {b.name: self._reading(state, b).in_scale for b in self.buckets(self.limits(state))}
        places = {p.bucket: p for p in reservation.places}
        now_us = now * 1000
        elapsed_us = now_us - reservation.reserved_at_ms * 1000
        deltas, bounds, guards = [], [], []
        for name, limit, period in reservation.buckets:
            bucket = scales.get(name) or Bucket(name, limit, period)
            tat = state.tats.get(name)
            if difference > 0:
                # A debt of at most one period (the bucket is never out for longer), from now at the
                # earliest: added to a TAT in the past, part of it was refilled before it was run up.
                behind_us = 0
                if tat is not None and tat < now_us:
                    behind_us = now_us - tat
                    guards.append((name, "=", tat))
                deltas.append((name, min(bucket.cost_us(difference), bucket.period_us) + behind_us))
                continue
            # Jobs admitted before places were kept count from zero: any change counted since was
            # after their take.
            place = places.get(name) or Place(name, 0, 0, 0, 0)
            rescaled = place.rescales != state.rescales.get(name, 0)
            if difference == 0 or not refunds or place.lowerings != state.lowerings.get(name, 0):
                # Lowered since the take (see ``Place``): no refund. A tenant may lose one after a
                # change of its limits, never gain past them. Nor on the last attempt (``settled``).
                continue
            if bucket.limit < limit:
                # In a scale below the reservation's, uncounted: a bucket written before buckets kept
                # their scale, after a redeploy lowered the defaults (which rescales nothing). As lowered.
                continue
            # What of the reservation has not refilled since its take, whatever other jobs did, at
            # the faster of the two rates (a reservation without a place: admitted before places),
            # in the bucket's time now (rounded down, as every refund).
            outstanding_us = (
                reservation.tokens * period - elapsed_us * max(limit, bucket.limit)
            ) // bucket.limit
            unused_us = bucket.refund_us(-difference)
            cap_us = outstanding_us
            if name in places and not rescaled and bucket.limit == limit:
                ahead_us = place.end_us - now_us - (state.refunded.get(name, 0) - place.refunded_us)
                if ahead_us > cap_us and unused_us > cap_us:
                    cap_us = ahead_us
                    refund = min(unused_us, cap_us)
                    bounds.append((name, place.refunded_us + place.end_us - now_us - refund))
            refund_us = max(0, min(unused_us, cap_us))
            if refund_us > 0:
                deltas.append((name, -refund_us))
                if refund_us > cap_us - SETTLE_SLACK_US and tat is not None:
                    # Capped by time: a job admitted between this read and the write would be
                    # queued behind the time given back, some of it refilled meanwhile.
                    guards.append((name, "<=", tat))
        # The day's spend, budgeted or not: a budget set while this job ran counts it once it settles
        # (set_tenant_limits counts only what had settled; this job's reservation committed nothing).
        committed = reservation.cost_nanos if reservation.budgeted else 0
        return Settlement(
            job_id,
            tuple(usage),
            utc_day(now),
            tuple(deltas),
            (reservation.day, cost - committed),
            rescales_seen=tuple((name, state.rescales.get(name, 0)) for name, _ in deltas),
            refund_bounds=tuple(bounds),
            tat_guards=tuple(guards),
        )

    def settled(
        self,
        job_id: str,
        reservation: Reservation | None,
        usage: Sequence[ModelUsage],
        commit: Callable[[Settlement], T],
    ) -> T:
        """``commit(settlement)``, settled again each time the store finds what it was computed
        against moved meanwhile (``SettlementStale``): the last attempt refunds nothing, so only a
        change of limits (or a take beside a debt) at each attempt could refuse it."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            settlement = self.settle(job_id, reservation, usage, refunds=attempt < SETTLE_ATTEMPTS)
            try:
                return commit(settlement)
            except SettlementStale:
                if attempt == SETTLE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def learn(self, model_id: str, estimate: Estimate, input_tokens: int) -> None:
        """Move the tenant's correction toward actual/estimated input (bounded moving average). Best
        effort: losing a race skips one sample."""
        for _ in range(3):
            stats = self._store.stats(model_id)
            if estimate.input_raw > 0 and input_tokens > 0:
                ratio_milli = input_tokens * 1000 / estimate.input_raw
                low, high = self.correction_bounds_milli
                blended = (1 - self.learning_rate) * stats.correction_milli + self.learning_rate * ratio_milli
                stats.correction_milli = min(high, max(low, round(blended)))
            stats.samples += 1
            if self._store.save_stats(model_id, stats, stats.version):
                return

    # ------------------------------------------------------------------ state
    def headers(
        self, state: UsageState, plan: ReservationPlan | None = None, *, window: str | None = None
    ) -> dict[str, str]:
        """X-RateLimit-* of the bucket with the fewest tokens left (the one a job would hit first: the
        per-minute bucket, or the per-day one once it is the tighter), after ``plan``'s takes when it
        was committed; of ``window``'s bucket when a 429 named it (its body and headers agree)."""
        now_us = self.now_ms() * 1000
        tightest: tuple[int, int, int] | None = None  # remaining, limit, reset seconds
        for bucket in self.buckets(self.limits(state)):
            if window is not None and bucket.name != window:
                continue
            reading = self._reading(state, bucket)
            for take in plan.takes if plan else ():
                if take.bucket == bucket.name and take.rescale is not None:
                    reading = Reading(bucket, bucket.limit, take.rescale.tat)  # converted by the take
                elif take.bucket == bucket.name:
                    start = take.now_us if take.kind == "restart" else (reading.tat or 0)
                    reading = reading._replace(tat=start + take.cost_us)
            remaining = reading.remaining(now_us)
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, bucket.limit, math.ceil(reading.reset_us(now_us) / 1e6))
        assert tightest is not None
        remaining, limit, reset = tightest
        return {
            "X-RateLimit-Limit-Tokens": str(limit),
            "X-RateLimit-Remaining-Tokens": str(remaining),
            "X-RateLimit-Reset-Tokens": str(reset),
        }

    def state(self) -> tuple[UsageState, dict[str, Any]]:
        now = self.now_ms()
        today = utc_day(now)
        state = self._store.state(None, today)
        limits = self.limits(state)
        now_us = now * 1000
        readings = [self._reading(state, bucket) for bucket in self.buckets(limits)]
        buckets = {
            f"tokens_per_{reading.bucket.name}": {
                "limit": reading.bucket.limit,
                "remaining": reading.remaining(now_us),
                "reset_seconds": math.ceil(reading.reset_us(now_us) / 1e6),
            }
            for reading in readings
        }
        budget = limits.daily_budget_nanos
        return state, {
            **buckets,
            "concurrent_jobs": {"limit": limits.max_concurrent_jobs, "running": state.running},
            "daily_budget": {
                "limit_usd": usd(budget) if budget is not None else None,
                "committed_usd": usd(state.committed_nanos),
                "reset_at": rfc3339(from_epoch(next_midnight_ms(now) / 1000)),
            },
        }

    def usage(self, since: date | None, until: date | None) -> dict[str, Any]:
        """Rollups by day from ``since`` to ``until`` (UTC, inclusive; the last 7 days by default)."""
        until = until or date.fromisoformat(utc_day(self.now_ms()))
        since = since or max(
            date.min, until - timedelta(days=min(DEFAULT_USAGE_DAYS - 1, until.toordinal() - 1))
        )
        if since > until or (until - since).days >= MAX_USAGE_DAYS:
            raise InvalidRequest(
                f"since must not be after until, and the range is at most {MAX_USAGE_DAYS} days",
                details={"since": since.isoformat(), "until": until.isoformat(), "max_days": MAX_USAGE_DAYS},
                suggestions=["Use ?since=2026-11-01&until=2026-11-30 (UTC dates); ask for a year at a time"],
            )
        state, limits = self.state()
        rows = self._store.rollups(since.isoformat(), until.isoformat())
        totals = {"jobs": 0, "input_tokens": 0, "output_tokens": 0, "cost_nanos": 0}
        by_model: dict[str, dict[str, int]] = {}
        for row in rows:
            model = by_model.setdefault(row["model"], dict.fromkeys(totals, 0))
            for key in totals:
                totals[key] += row[key]
                model[key] += row[key]
        return {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "days": [_public_row(row) for row in rows],
            "by_model": {name: _public_row(model) for name, model in by_model.items()},
            "totals": _public_row(totals),
            "limits": limits,
            "headers": self.headers(state),
        }


def _deciding(refusal: TokenLimitExceeded) -> tuple[bool, float]:
    return refusal.headers.get("x-should-retry") == "false", refusal.retry_after_seconds


def _public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A rollup as the API shows it: dollars, not nano-dollars."""
    public = {k: v for k, v in row.items() if k != "cost_nanos"}
    public["cost_usd"] = usd(int(row["cost_nanos"]))
    return public
