"""Limits, the state they are checked against, reservations and settlements (integers throughout:
tokens, microseconds for bucket times, milliseconds for instants, nano-dollars for money)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

MINUTE_US = 60_000_000
DAY_US = 86_400_000_000


class TenantLimits(NamedTuple):
    tokens_per_minute: int
    tokens_per_day: int
    max_concurrent_jobs: int
    daily_budget_nanos: int | None = None


class Bucket(NamedTuple):
    """A token bucket as GCRA sees it: ``limit`` tokens per ``period_us``, burst = ``limit``.

    State is one number, the theoretical arrival time (TAT, epoch microseconds): the bucket is full
    when TAT <= now, and holds ``(now + period - TAT) x limit / period`` tokens otherwise.
    """

    name: str
    limit: int
    period_us: int

    def cost_us(self, tokens: int) -> int:
        """How far ``tokens`` move the TAT (rounded up: never under-charged)."""
        return -(-tokens * self.period_us // self.limit)

    def refund_us(self, tokens: int) -> int:
        """How far giving ``tokens`` back moves the TAT (rounded down: never over-refunded)."""
        return tokens * self.period_us // self.limit

    def remaining(self, tat: int | None, now: int) -> int:
        if tat is None or tat <= now:
            return self.limit
        return max(0, min(self.limit, (now + self.period_us - tat) * self.limit // self.period_us))

    def reset_us(self, tat: int | None, now: int) -> int:
        """Microseconds until the bucket is full again."""
        return 0 if tat is None else max(0, tat - now)

    def available_at(self, tat: int | None, now: int, tokens: int) -> int:
        """When ``tokens`` will fit (epoch microseconds)."""
        base = now if tat is None else max(tat, now)
        return max(now, base + self.cost_us(tokens) - self.period_us)

    def rescaled(self, tat: int | None, now: int, limit: int) -> int | None:
        """The TAT that keeps the tokens outstanding in this bucket outstanding under a new ``limit``
        (the TAT is time, and a token's share of the period depends on the limit: read as it stood,
        raising a limit from 5,000 to 10 million a day took 4 million tokens from the tenant). A
        debt of at most one period, as a settlement's; None when nothing is outstanding."""
        if tat is None or tat <= now:
            return None
        outstanding = (tat - now) * self.limit  # tokens x period
        return now + min(self.period_us, -(-outstanding // limit))

    def forgives(self, tat: int | None, now: int, limit: int) -> bool:
        """Whether ``rescaled`` to ``limit`` caps what is outstanding (more than a period of the new
        limit): the tokens past it are forgiven, as by a lowering, raised or not."""
        return tat is not None and (tat - now) * self.limit > self.period_us * limit

    def take(self, tat: int | None, now: int, tokens: int, version: int = 0) -> BucketTake | None:
        """The write that takes ``tokens`` from a bucket last seen at ``tat`` (and at scale version
        ``version``), or None when they do not fit. Its condition holds only while the bucket is in
        the state it was seen in, so a take that raced another is refused by the store and retried,
        never applied twice or on a wrong base."""
        cost = self.cost_us(tokens)
        if tokens > self.limit:
            return None
        if tat is None or tat <= now:
            return BucketTake(self.name, "restart", cost, now, limit=self.limit, version=version)
        if tat + cost > now + self.period_us:
            return None
        return BucketTake(
            self.name,
            "advance",
            cost,
            now,
            latest=now + self.period_us - cost,
            limit=self.limit,
            version=version,
        )

    def take_rescaled(
        self, scale: int, tat: int | None, now: int, tokens: int, version: int
    ) -> tuple[BucketTake | None, int | None]:
        """A take from a bucket whose TAT is in another limit's scale (``scale``: a redeploy changed
        the deployment's defaults, which rescales nothing when it happens): converted to this limit
        (``rescaled``) and taken from in one write, held on the TAT as seen. With the TAT it was
        converted to (what a refusal reports)."""
        before = self._replace(limit=scale)
        converted = before.rescaled(tat, now, self.limit)
        take = self.take(converted, now, tokens, version)
        if take is None:
            return None, converted
        start = now if take.kind == "restart" or converted is None else converted
        lowered = self.limit < scale or before.forgives(tat, now, self.limit)
        rescale = Rescale(self.name, tat, start + take.cost_us, self.limit, lowered, version)
        return take._replace(kind="rescale", rescale=rescale), converted


class Reading(NamedTuple):
    """A bucket as the limit that applies reads it (``bucket``), its TAT (``tat``) in the scale it is
    in (``scale``, the limit it records): the same but after a redeploy changed the deployment's
    defaults, until the bucket's next take converts it; it refills at that scale's rate meanwhile."""

    bucket: Bucket
    scale: int
    tat: int | None

    @property
    def in_scale(self) -> Bucket:
        """The bucket at the limit its TAT is in (what its moves are counted at)."""
        return self.bucket._replace(limit=self.scale)

    def converted(self, now: int) -> int | None:
        """The TAT at the bucket's limit (what is outstanding carried over, as a take would)."""
        if self.scale == self.bucket.limit:
            return self.tat
        return self.in_scale.rescaled(self.tat, now, self.bucket.limit)

    def remaining(self, now: int) -> int:
        return self.bucket.remaining(self.converted(now), now)

    def reset_us(self, now: int) -> int:
        """Microseconds until the bucket is full again, at the rate it refills at."""
        return self.bucket.reset_us(self.tat, now)

    def available_at(self, now: int, tokens: int) -> int:
        """When ``tokens`` will fit (epoch microseconds), if nothing else is taken: in another scale,
        when what is outstanding there, refilling at its rate, leaves room for them at the limit."""
        if self.scale == self.bucket.limit:
            return self.bucket.available_at(self.tat, now, tokens)
        if self.tat is None:
            return now
        # as the converting take counts it (both rounded up): the converted backlog and the cost
        # must fit in a period, (tat - t) x scale <= (period - cost) x limit
        room_us = (self.bucket.period_us - self.bucket.cost_us(tokens)) * self.bucket.limit // self.scale
        return max(now, self.tat - room_us)


class BucketTake(NamedTuple):
    """``restart``: the bucket was full: TAT = now + cost, if it still is (TAT <= now or unset).
    ``advance``: it was not: TAT += cost, if TAT is still in (now, latest].
    ``rescale``: its TAT was in another scale: TAT = ``rescale.tat`` (converted, then taken from), if
    it is still ``rescale.seen_tat``; the bucket's scale version counted (and its lowerings).
    Each holds on the bucket's scale version as read (``version``), and records the limit the TAT is
    in after it (``limit``, the bucket's ``scale``)."""

    bucket: str
    kind: Literal["restart", "advance", "rescale"]
    cost_us: int
    now_us: int
    latest: int = 0
    limit: int = 0
    version: int = 0
    rescale: Rescale | None = None


class Estimate(NamedTuple):
    """What admission reserves for a job, and how it was reached (kept on the job for learning)."""

    input_raw: int  # tiktoken x family calibration
    correction_milli: int  # the tenant's learned actual/estimated ratio for this model, x 1000
    input_tokens: int  # input_raw x correction
    output_tokens: int  # max_tokens, or the tenant's recent high percentile (never below a floor)

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class UsageState(NamedTuple):
    """What admission reads of a tenant's usage partition, in one request."""

    limits: TenantLimits | None = None
    tats: Mapping[str, int | None] = {}  # bucket name -> TAT (a shared default: read-only, Mapping)
    running: int = 0
    committed_nanos: int = 0  # today's budget commitments
    correction_milli: int = 1000
    # bucket name -> its refund counter (microseconds refunded since the counter began, at the
    # bucket's scale) and how many times a change of limits rescaled it: see ``Place``
    refunded: Mapping[str, int] = {}
    rescales: Mapping[str, int] = {}
    lowerings: Mapping[str, int] = {}  # how many of those rescales lowered its limit
    # bucket name -> the limit its TAT is in (set by every take and rescale; none on buckets written
    # before it was kept: the limits that apply). It differs from the limits that apply only after a
    # redeploy changed the deployment's defaults: the next take converts the bucket.
    scales: Mapping[str, int] = {}


class Place(NamedTuple):
    """Where a reservation stands in one bucket, for the cap of its refund: GCRA refills the
    bucket's whole backlog in order, and a reservation made behind others is queued behind them. What
    of it is still ahead of now is at least ``end_us`` (the TAT right after its take, or a lower bound
    of it) less now, less what the bucket refunded since (its counter, ``refunded_us``, was read before
    the take): after the take the TAT only rises but by refunds (counted) and rescales (``rescales``,
    the bucket's scale version: a change of its limit since ends the place's use). A refill that
    emptied the bucket since leaves the bound at or below zero.

    ``lowerings``: how many of the rescales lowered the limit. Raised only since, the bucket refilled
    at most at the limit now and carried over everything outstanding, so what has not refilled since
    the take at that rate is still outstanding; a lowering may have forgiven part of the backlog (a
    rescale keeps a debt of one period at most) and the bucket may have refilled faster than the limit
    now: nothing is refunded."""

    bucket: str
    end_us: int
    refunded_us: int
    rescales: int
    lowerings: int = 0


class Rescale(NamedTuple):
    """A change of one bucket's limit, as ``set_tenant_limits`` (or a take, ``Bucket.take_rescaled``)
    plans it against the TAT and the scale version it read."""

    bucket: str
    seen_tat: int | None  # None: the bucket was never taken from
    tat: int | None  # what is outstanding at the new scale; None: nothing is
    limit: int  # the new scale (recorded on the bucket)
    lowered: bool
    version: int = 0  # the bucket's scale version as read


class Reservation(NamedTuple):
    """What admission took for a job, kept on the job item and given back (or topped up) when it ends."""

    tokens: int
    cost_nanos: int
    day: str  # UTC date the budget was committed on
    reserved_at_ms: int
    buckets: tuple[tuple[str, int, int], ...] = ()  # (name, limit, period_us) of the buckets taken from
    budgeted: bool = False  # a daily budget applied: the settlement moves the day's commitments
    places: tuple[Place, ...] = ()  # none on jobs admitted before places were kept

    def item(self) -> dict[str, Any]:
        return {
            **self._asdict(),
            "buckets": [list(b) for b in self.buckets],
            "places": [list(p) for p in self.places],
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Reservation:
        return cls(
            tokens=int(item["tokens"]),
            cost_nanos=int(item["cost_nanos"]),
            day=str(item["day"]),
            reserved_at_ms=int(item["reserved_at_ms"]),
            buckets=tuple((str(n), int(limit), int(period)) for n, limit, period in item.get("buckets", [])),
            budgeted=bool(item.get("budgeted", False)),
            places=tuple(
                Place(str(place[0]), *(int(n) for n in place[1:])) for place in item.get("places", [])
            ),
        )


class ReservationPlan(NamedTuple):
    """The conditional writes that take a reservation, committed with the job in one transaction."""

    reservation: Reservation
    takes: tuple[BucketTake, ...]
    max_running: int
    budget_room_nanos: int | None = None  # commit only if today's commitments are at most this
    # The tenant's own limits as the plan read them (None: it had none, the defaults applied): the
    # takes hold on them. The read is not a snapshot, and a change of limits landing between its item
    # reads gave the limits before it and the buckets after: a take planned at 100,000 a minute, on
    # condition of the scale version the lowering to 1,000 had just counted, took 5 of 500 tokens.
    limits_seen: TenantLimits | None = None


class ModelUsage(NamedTuple):
    """Tokens one model consumed for a job (a job that fell back mid-stream has several)."""

    model_id: str
    input_tokens: int
    output_tokens: int
    cost_nanos: int


class Settlement(NamedTuple):
    """Replace a job's reservation with its actual usage: done once, in the same transaction as the
    job's final write. The limiter computes every number; a store only applies them."""

    job_id: str
    usage: tuple[ModelUsage, ...]
    day: str  # UTC date of the end, for the rollups
    bucket_deltas: tuple[tuple[str, int], ...]  # (bucket, microseconds) to move each TAT by
    budget: tuple[str, int] | None = None  # (day, nano-dollars) to move that day's commitments by
    release_slot: bool = True
    # What the bucket moves were computed against, for the store to write them only while it still
    # holds (else ``SettlementStale``, nothing written, and the limiter settles again): each moved
    # bucket's rescale count as read (its limit has not changed since: the moves are in its scale)...
    rescales_seen: tuple[tuple[str, int], ...] = ()
    # ...and, per bucket whose refund counted on its place, the most its refund counter may hold for
    # the refund to stand (the place less the refunds since still covers it: see ``Place``).
    refund_bounds: tuple[tuple[str, int], ...] = ()
    # ...and, per bucket whose move counted on its TAT as read, that TAT: ``("<=", tat)`` for a refund
    # capped by time (a take since would be pulled into time that refilled between the read and the
    # write), ``("=", tat)`` for a debt that starts now (the TAT was in the past).
    tat_guards: tuple[tuple[str, str, int], ...] = ()

    @property
    def input_tokens(self) -> int:
        return sum(u.input_tokens for u in self.usage)

    @property
    def output_tokens(self) -> int:
        return sum(u.output_tokens for u in self.usage)

    @property
    def cost_nanos(self) -> int:
        return sum(u.cost_nanos for u in self.usage)


class SettlementStale(Exception):
    """The store did not write a settlement: a bucket it was computed against changed meanwhile (its
    limit, its refund counter past the bound, its TAT where guarded); nothing was written, and the
    limiter settles again."""
