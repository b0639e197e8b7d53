"""Limits, reservations and settlements."""

from __future__ import annotations

import math
from dataclasses import dataclass

MINUTE = 60.0
DAY = 86_400.0


@dataclass(frozen=True)
class TenantLimits:
    tokens_per_minute: int
    tokens_per_day: int
    max_concurrent_jobs: int
    daily_budget_usd: float | None = None


@dataclass(frozen=True)
class Bucket:
    """A token bucket as GCRA sees it: ``limit`` tokens per ``period`` seconds, burst = ``limit``.

    State is one number, the theoretical arrival time (TAT): the bucket is full when TAT <= now,
    and holds ``(now + period - TAT) / interval`` tokens otherwise.
    """

    name: str
    limit: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds one token takes to refill."""
        return self.period / self.limit

    def remaining(self, tat: float | None, now: float) -> int:
        if tat is None or tat <= now:
            return self.limit
        return max(0, min(self.limit, math.floor((now + self.period - tat) / self.interval + 1e-9)))

    def reset_seconds(self, tat: float | None, now: float) -> float:
        """Seconds until the bucket is full again."""
        return 0.0 if tat is None else max(0.0, tat - now)

    def available_at(self, tat: float | None, now: float, tokens: int) -> float:
        """When ``tokens`` will fit (epoch seconds)."""
        base = now if tat is None else max(tat, now)
        return max(now, base + tokens * self.interval - self.period)


@dataclass(frozen=True)
class Estimate:
    """What admission reserves for a job, and how it was reached (kept on the job for learning)."""

    input_raw: int  # tiktoken x family calibration
    correction: float  # the tenant's learned actual/estimated ratio for this model
    input_tokens: int  # input_raw x correction
    output_tokens: int  # max_tokens, or the tenant's recent high percentile (never below a floor)

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Reservation:
    tokens: int
    cost_usd: float
    day: str  # UTC date the budget was committed on
    concurrency: bool = True


@dataclass(frozen=True)
class Settlement:
    """Replace a job's reservation with its actual usage (done once, with the job's final write)."""

    job_id: str
    model_id: str
    reserved_tokens: int
    reserved_cost_usd: float
    reserved_day: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    day: str  # UTC date of completion

    @property
    def actual_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
