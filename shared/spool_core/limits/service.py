"""The rate limiter's logic: estimate, reserve atomically, roll back, settle, learn."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from spool_core.clock import from_epoch, rfc3339
from spool_core.limits.errors import BudgetExceeded, TokenLimitExceeded, TooManyConcurrentJobs
from spool_core.limits.model import DAY, MINUTE, Bucket, Estimate, Reservation, Settlement, TenantLimits


@dataclass
class ModelStats:
    """What a tenant's past jobs on one model taught: the correction factor and recent outputs."""

    correction: float = 1.0
    outputs: list[int] = field(default_factory=list)
    samples: int = 0
    version: int = 0


class UsageStore(Protocol):
    def limits(self) -> TenantLimits | None: ...

    def tat(self, bucket: Bucket) -> float | None: ...

    def take(self, bucket: Bucket, tokens: int, now: float) -> tuple[bool, float | None]:
        """Atomically take ``tokens`` if they fit; returns (taken, the bucket's TAT)."""

    def give_back(self, bucket: Bucket, tokens: int) -> None: ...

    def acquire_slot(self, maximum: int) -> tuple[bool, int]: ...

    def release_slot(self) -> None: ...

    def running(self) -> int: ...

    def commit_budget(self, day: str, cost_usd: float, budget_usd: float) -> tuple[bool, float]: ...

    def uncommit_budget(self, day: str, cost_usd: float) -> None: ...

    def committed(self, day: str) -> float: ...

    def stats(self, model_id: str) -> ModelStats: ...

    def save_stats(self, model_id: str, stats: ModelStats, expected_version: int) -> bool: ...

    def settlement_writes(
        self, settlement: Settlement, buckets: Sequence[Bucket]
    ) -> list[dict[str, Any]]: ...

    def rollups(self, since: str, until: str) -> list[dict[str, Any]]: ...


class _Reserved(Protocol):
    job_id: str
    model_resolved: str
    reservation: dict[str, Any] | None


def settle(job: _Reserved, input_tokens: int, output_tokens: int, cost_usd: float, now: float) -> Settlement:
    """The settlement of a job's reservation against what it actually used."""
    reserved = job.reservation or {"tokens": 0, "cost_usd": 0.0, "day": utc_day(now)}
    return Settlement(
        job_id=job.job_id,
        model_id=job.model_resolved,
        reserved_tokens=int(reserved["tokens"]),
        reserved_cost_usd=float(reserved["cost_usd"]),
        reserved_day=str(reserved["day"]),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd,
        day=utc_day(now),
    )


def utc_day(moment: float) -> str:
    return from_epoch(moment).strftime("%Y-%m-%d")


def next_midnight(moment: float) -> float:
    day = from_epoch(moment).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()


class RateLimiter:
    def __init__(
        self,
        store: UsageStore,
        defaults: TenantLimits,
        *,
        clock: Callable[[], float] = time.time,
        min_output_tokens: int = 256,
        correction_bounds: tuple[float, float] = (0.5, 2.0),
        learning_rate: float = 0.2,
        output_window: int = 20,
        output_percentile: float = 0.9,
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._clock = clock
        self.min_output_tokens = min_output_tokens
        self.correction_bounds = correction_bounds
        self.learning_rate = learning_rate
        self.output_window = output_window
        self.output_percentile = output_percentile
        self._limits: TenantLimits | None = None

    # ------------------------------------------------------------------ limits
    @property
    def limits(self) -> TenantLimits:
        if self._limits is None:
            self._limits = self._store.limits() or self._defaults
        return self._limits

    def buckets(self) -> tuple[Bucket, Bucket]:
        return (
            Bucket("minute", self.limits.tokens_per_minute, MINUTE),
            Bucket("day", self.limits.tokens_per_day, DAY),
        )

    # ------------------------------------------------------------------ estimate
    def estimate(self, model_id: str, input_raw: int, max_tokens: int) -> Estimate:
        stats = self._store.stats(model_id)
        input_tokens = math.ceil(input_raw * stats.correction)
        output = max_tokens
        if len(stats.outputs) >= 5:
            ranked = sorted(stats.outputs)
            high = ranked[min(len(ranked) - 1, math.ceil(self.output_percentile * len(ranked)) - 1)]
            output = min(max_tokens, max(high, min(max_tokens, self.min_output_tokens)))
        return Estimate(
            input_raw=input_raw, correction=stats.correction, input_tokens=input_tokens, output_tokens=output
        )

    # ------------------------------------------------------------------ reserve / roll back
    def reserve(self, tokens: int, cost_usd: float) -> Reservation:
        """Reserve a job's slot, tokens and cost, or raise the matching 429 holding nothing."""
        now = self._clock()
        limits = self.limits
        ok, running = self._store.acquire_slot(limits.max_concurrent_jobs)
        if not ok:
            raise TooManyConcurrentJobs(
                f"{running} jobs are already queued or running; the limit is {limits.max_concurrent_jobs}",
                retry_after_seconds=1,
                details={"running": running, "limit": limits.max_concurrent_jobs},
            )
        taken: list[Bucket] = []
        try:
            for bucket in self.buckets():
                done, tat = self._store.take(bucket, tokens, now)
                if not done:
                    raise self._token_limit(bucket, tokens, tat, now)
                taken.append(bucket)
            day = utc_day(now)
            if limits.daily_budget_usd is not None:
                done, committed = self._store.commit_budget(day, cost_usd, limits.daily_budget_usd)
                if not done:
                    raise BudgetExceeded(
                        f"Today's spend ({committed:.4f} USD) plus this job's estimate ({cost_usd:.4f} USD)"
                        f" exceeds the daily budget ({limits.daily_budget_usd:.2f} USD)",
                        retry_after_seconds=next_midnight(now) - now,
                        details={
                            "budget_usd": limits.daily_budget_usd,
                            "spent_usd": round(committed, 6),
                            "estimated_cost_usd": round(cost_usd, 6),
                            "reset_at": rfc3339(from_epoch(next_midnight(now))),
                        },
                    )
        except BaseException:
            for bucket in taken:
                self._store.give_back(bucket, tokens)
            self._store.release_slot()
            raise
        return Reservation(tokens=tokens, cost_usd=cost_usd, day=day)

    def cancel(self, reservation: Reservation) -> None:
        """Undo a reservation whose job was never created."""
        for bucket in self.buckets():
            self._store.give_back(bucket, reservation.tokens)
        if self.limits.daily_budget_usd is not None:
            self._store.uncommit_budget(reservation.day, reservation.cost_usd)
        if reservation.concurrency:
            self._store.release_slot()

    def _token_limit(self, bucket: Bucket, tokens: int, tat: float | None, now: float) -> TokenLimitExceeded:
        remaining = bucket.remaining(tat, now)
        reset_at = bucket.available_at(tat, now, tokens) if tokens <= bucket.limit else next_midnight(now)
        per = "minute" if bucket.period == MINUTE else "day"
        suggestions = None
        if tokens > bucket.limit:
            suggestions = [
                f"This job needs {tokens:,} tokens, more than the whole per-{per} limit:"
                " lower max_tokens or send less context",
                "Ask for a higher limit",
            ]
        return TokenLimitExceeded(
            f"This job needs {tokens:,} tokens; {remaining:,} of {bucket.limit:,} per {per} remain",
            retry_after_seconds=max(1.0, reset_at - now),
            details={
                "tokens_requested": tokens,
                "tokens_remaining": remaining,
                "limit": bucket.limit,
                "window": per,
                "reset_at": rfc3339(from_epoch(reset_at)),
            },
            suggestions=suggestions,
        )

    # ------------------------------------------------------------------ settle / learn
    def settlement_writes(self, settlement: Settlement) -> list[dict[str, Any]]:
        return self._store.settlement_writes(settlement, self.buckets())

    def learn(self, model_id: str, estimate: Estimate, input_tokens: int, output_tokens: int) -> None:
        """Move the tenant's correction toward actual/estimated input (bounded moving average) and
        remember the output size. Best effort: losing a race skips one sample."""
        for _ in range(3):
            stats = self._store.stats(model_id)
            if estimate.input_raw > 0 and input_tokens > 0:
                ratio = input_tokens / estimate.input_raw
                low, high = self.correction_bounds
                blended = (1 - self.learning_rate) * stats.correction + self.learning_rate * ratio
                stats.correction = min(high, max(low, blended))
            stats.outputs = [*stats.outputs, output_tokens][-self.output_window :]
            stats.samples += 1
            if self._store.save_stats(model_id, stats, stats.version):
                return

    # ------------------------------------------------------------------ state
    def headers(self) -> dict[str, str]:
        minute, _ = self.buckets()
        now = self._clock()
        tat = self._store.tat(minute)
        return {
            "X-RateLimit-Limit-Tokens": str(minute.limit),
            "X-RateLimit-Remaining-Tokens": str(minute.remaining(tat, now)),
            "X-RateLimit-Reset-Tokens": str(math.ceil(minute.reset_seconds(tat, now))),
        }

    def state(self) -> dict[str, Any]:
        now = self._clock()
        limits = self.limits
        buckets = {}
        for bucket in self.buckets():
            tat = self._store.tat(bucket)
            buckets[f"tokens_per_{bucket.name}"] = {
                "limit": bucket.limit,
                "remaining": bucket.remaining(tat, now),
                "reset_seconds": math.ceil(bucket.reset_seconds(tat, now)),
            }
        today = utc_day(now)
        return {
            **buckets,
            "concurrent_jobs": {"limit": limits.max_concurrent_jobs, "running": self._store.running()},
            "daily_budget": {
                "limit_usd": limits.daily_budget_usd,
                "committed_usd": round(self._store.committed(today), 6),
                "reset_at": rfc3339(from_epoch(next_midnight(now))),
            },
        }

    def usage(self, since: str | None, until: str | None) -> dict[str, Any]:
        now = self._clock()
        until = until or utc_day(now)
        since = since or (datetime.fromisoformat(until).replace(tzinfo=UTC) - timedelta(days=6)).strftime(
            "%Y-%m-%d"
        )
        rows = self._store.rollups(since, until)
        totals = {"jobs": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        by_model: dict[str, dict[str, Any]] = {}
        for row in rows:
            model = by_model.setdefault(row["model"], {k: 0 for k in totals} | {"cost_usd": 0.0})
            for key in totals:
                totals[key] += row[key]
                model[key] += row[key]
        totals["cost_usd"] = round(totals["cost_usd"], 8)
        for model in by_model.values():
            model["cost_usd"] = round(model["cost_usd"], 8)
        return {
            "since": since,
            "until": until,
            "days": rows,
            "by_model": by_model,
            "totals": totals,
            "limits": self.state(),
        }
