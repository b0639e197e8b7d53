"""The usage table: one partition per tenant holding its buckets, concurrency counter, budget,
learned statistics, limits and daily rollups (sort keys ``bucket#``, ``concurrency``, ``day#``,
``stats#``, ``limits``, ``rollup#<date>#<model>``). Every quantity is an integer: tokens, bucket times
in microseconds, money in nano-dollars.

Admission and settlement are not written here but by the job store, in the same transaction as the
job; this module builds their entries (``reservation_writes``, ``settlement_writes``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable, batch_get, transact
from spool_core.errors import Conflict
from spool_core.limits.model import Rescale, ReservationPlan, Settlement, TenantLimits, UsageState
from spool_core.limits.service import ModelStats

KIND = "usage"
IDENT = "tenant"
ROLLUP_TTL_SECONDS = 400 * 86_400
COUNT_ATTEMPTS = 5  # of counting a day's spend (a budget's start) against jobs settling meanwhile


def _sk(value: str) -> dict[str, str]:
    return {"sk": value}


def state_keys(table: ScopedTable, model_id: str | None, day: str) -> list[dict[str, Any]]:
    """The items admission reads: limits, buckets, concurrency, today's budget, the model's stats."""
    names = ["limits", "bucket#minute", "bucket#day", "concurrency", f"day#{day}"]
    if model_id:
        names.append(f"stats#{model_id}")
    return [table.key(KIND, IDENT, _sk(name)) for name in names]


BUCKETS = ("minute", "day")


def state_from(items: Iterable[dict[str, Any]], day: str) -> UsageState:
    """A usage partition's items (any of them: ``state_keys``) as the limiter reads them."""
    by_sk = {str(item["sk"]): item for item in items}
    limits = by_sk.get("limits")
    stats = next((item for sk, item in by_sk.items() if sk.startswith("stats#")), None)
    buckets = {name: by_sk.get(f"bucket#{name}", {}) for name in BUCKETS}

    def per_bucket(attribute: str) -> dict[str, int]:
        """Each bucket's number ``attribute``, where it has one (a counter it lacks is 0 to readers)."""
        return {name: int(item[attribute]) for name, item in buckets.items() if attribute in item}

    tats, rescales = per_bucket("tat_us"), per_bucket("rescales")
    # A scale is the TAT's only while the bucket's version is the one it was recorded at: code from
    # before scales were kept (a rollback, an older CLI) counts rescales without recording one. A
    # scale without its version (recorded by 8c366ef-7f87346, which set one at every take and rescale)
    # is the TAT's.
    at = per_bucket("scale_at")
    scales = {
        name: scale
        for name, scale in per_bucket("scale").items()
        if at.get(name, rescales.get(name, 0)) == rescales.get(name, 0)
    }
    return UsageState(
        limits=_limits(limits) if limits else None,
        tats={name: tats.get(name) for name in BUCKETS},
        running=int(by_sk.get("concurrency", {}).get("running", 0)),
        committed_nanos=int(by_sk.get(f"day#{day}", {}).get("committed_nanos", 0)),
        correction_milli=int(stats["correction_milli"]) if stats else 1000,
        refunded=per_bucket("refunded_us"),
        rescales=rescales,
        lowerings=per_bucket("lowerings"),
        scales=scales,
    )


def _limits_item(limits: TenantLimits) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "sk": "limits",
        "tokens_per_minute": limits.tokens_per_minute,
        "tokens_per_day": limits.tokens_per_day,
        "max_concurrent_jobs": limits.max_concurrent_jobs,
    }
    if limits.daily_budget_nanos is not None:
        attributes["daily_budget_nanos"] = limits.daily_budget_nanos
    return attributes


def _limits(item: dict[str, Any]) -> TenantLimits:
    budget = item.get("daily_budget_nanos")
    return TenantLimits(
        tokens_per_minute=int(item["tokens_per_minute"]),
        tokens_per_day=int(item["tokens_per_day"]),
        max_concurrent_jobs=int(item["max_concurrent_jobs"]),
        daily_budget_nanos=int(budget) if budget is not None else None,
    )


def reservation_writes(table: ScopedTable, plan: ReservationPlan) -> list[dict[str, Any]]:
    """Transaction entries that take a reservation: each conditional on the state it was planned on
    (see ``Bucket.take``), so a take that raced another is cancelled, never applied twice."""
    writes = [
        table.update_request(
            KIND,
            IDENT,
            "SET running = if_not_exists(running, :zero) + :one",
            sort=_sk("concurrency"),
            condition="attribute_not_exists(running) OR running < :max",
            values={":zero": 0, ":one": 1, ":max": plan.max_running},
        )
    ]
    for take in plan.takes:
        # ...and on the bucket's scale version: a take converted at a limit changed since would
        # take at the wrong scale (planned at 100,000 a minute and written after a lowering to
        # 1,000, 500 tokens took 5). Each records the limit the TAT is in after it.
        if take.rescale is not None:
            writes.append(_rescale_request(table, take.rescale))
            continue
        scale, values = _scale_condition(take.version)
        values.update({":limit": take.limit, ":at": take.version})
        if take.kind == "restart":
            writes.append(
                table.update_request(
                    KIND,
                    IDENT,
                    "SET tat_us = :start, scale = :limit, scale_at = :at",
                    sort=_sk(f"bucket#{take.bucket}"),
                    condition=f"(attribute_not_exists(tat_us) OR tat_us <= :now) AND {scale}",
                    values={":start": take.now_us + take.cost_us, ":now": take.now_us, **values},
                )
            )
        else:
            writes.append(
                table.update_request(
                    KIND,
                    IDENT,
                    "SET tat_us = tat_us + :cost, scale = :limit, scale_at = :at",
                    sort=_sk(f"bucket#{take.bucket}"),
                    condition=f"tat_us > :now AND tat_us <= :latest AND {scale}",
                    values={":cost": take.cost_us, ":now": take.now_us, ":latest": take.latest, **values},
                )
            )
    # ...and on the limits they were planned at (``ReservationPlan.limits_seen``).
    condition, values = limits_condition(plan.limits_seen, whole=True)
    writes.append(table.check_request(KIND, IDENT, condition, sort=_sk("limits"), values=values))
    if plan.budget_room_nanos is not None:
        writes.append(
            table.update_request(
                KIND,
                IDENT,
                "SET committed_nanos = if_not_exists(committed_nanos, :zero) + :cost",
                sort=_sk(f"day#{plan.reservation.day}"),
                condition="attribute_not_exists(committed_nanos) OR committed_nanos <= :room",
                values={":zero": 0, ":cost": plan.reservation.cost_nanos, ":room": plan.budget_room_nanos},
            )
        )
    return writes


def limits_condition(limits: TenantLimits | None, *, whole: bool = False) -> tuple[str, dict[str, Any]]:
    """That the tenant's own token limits (``whole``: all its limits) are still ``limits`` (None:
    that it still has none of its own)."""
    if limits is None:
        return "attribute_not_exists(tokens_per_minute)", {}
    condition = "tokens_per_minute = :minute AND tokens_per_day = :day"
    values: dict[str, Any] = {":minute": limits.tokens_per_minute, ":day": limits.tokens_per_day}
    if whole:
        condition += " AND max_concurrent_jobs = :jobs"
        values[":jobs"] = limits.max_concurrent_jobs
        if limits.daily_budget_nanos is None:
            condition += " AND attribute_not_exists(daily_budget_nanos)"
        else:
            condition += " AND daily_budget_nanos = :budget"
            values[":budget"] = limits.daily_budget_nanos
    return condition, values


def _rescale_request(table: ScopedTable, move: Rescale) -> dict[str, Any]:
    """A bucket moved to the scale of ``move.limit`` (and its TAT set when something is outstanding
    there), its scale version counted (and its lowerings), if its TAT and version are still the ones
    seen: a reservation's place, and a take or a settlement planned before, are in the old scale."""
    unmoved = "attribute_not_exists(tat_us)" if move.seen_tat is None else "tat_us = :seen"
    version, values = _scale_condition(move.version)
    values.update({":one": 1, ":limit": move.limit, ":at": move.version + 1})
    if move.seen_tat is not None:
        values[":seen"] = move.seen_tat
    expression = "SET scale = :limit, scale_at = :at"
    if move.tat is not None:
        expression += ", tat_us = :tat"
        values[":tat"] = move.tat
    expression += " ADD rescales :one" + (", lowerings :one" if move.lowered else "")
    return table.update_request(
        KIND,
        IDENT,
        expression,
        sort=_sk(f"bucket#{move.bucket}"),
        condition=f"{unmoved} AND {version}",
        values=values,
    )


def _scale_condition(rescales: int) -> tuple[str, dict[str, Any]]:
    """That a bucket's scale version (``rescales``) is still the one seen."""
    if not rescales:
        return "attribute_not_exists(rescales)", {}
    return "rescales = :rescales", {":rescales": rescales}


def settlement_writes(table: ScopedTable, settlement: Settlement, now_ms: int) -> list[dict[str, Any]]:
    """Transaction entries that replace a reservation with the actual usage; they go in the same
    transaction as the job's final write, so they happen exactly once (the job's own condition
    guards the whole transaction). Each bucket move also holds only while what it was computed
    against does (``stale_settlement`` tells that failure from the job's): the bucket's scale
    version; for a refund that counted on its place, its refund counter at most the bound; where
    guarded, its TAT. A refund adds to its bucket's counter."""
    writes: list[dict[str, Any]] = []
    versions, bounds = dict(settlement.rescales_seen), dict(settlement.refund_bounds)
    guards = {name: (operator, tat) for name, operator, tat in settlement.tat_guards}
    for name, delta in settlement.bucket_deltas:
        expression = "SET tat_us = if_not_exists(tat_us, :now) + :delta"
        condition, values = _scale_condition(versions.get(name, 0))
        values.update({":now": now_ms * 1000, ":delta": delta})
        if delta < 0:
            expression += " ADD refunded_us :refund"
            values[":refund"] = -delta
        if name in bounds:
            condition += " AND (attribute_not_exists(refunded_us) OR refunded_us <= :bound)"
            values[":bound"] = bounds[name]
        if name in guards:
            operator, values[":tat"] = guards[name]
            condition += f" AND tat_us {operator} :tat"
        writes.append(
            table.update_request(
                KIND, IDENT, expression, sort=_sk(f"bucket#{name}"), condition=condition, values=values
            )
        )
    if settlement.release_slot:
        writes.append(
            table.update_request(
                KIND,
                IDENT,
                "SET running = if_not_exists(running, :one) - :one",
                sort=_sk("concurrency"),
                values={":one": 1},
            )
        )
    if settlement.budget is not None:
        # The reservation's day moves by the difference; ``counted_nanos``, the settled spend a day's
        # commitments hold (``count_spend``), goes to the day of the rollups, the settlement's: the
        # same item but for a job that ends after midnight UTC.
        day, delta = settlement.budget
        counted = "counted_nanos = if_not_exists(counted_nanos, :zero) + :cost"
        values = {":zero": 0, ":delta": delta, ":cost": settlement.cost_nanos}
        committed = "committed_nanos = if_not_exists(committed_nanos, :zero) + :delta"
        if day == settlement.day:
            writes.append(
                table.update_request(
                    KIND, IDENT, f"SET {committed}, {counted}", sort=_sk(f"day#{day}"), values=values
                )
            )
        else:
            writes.append(
                table.update_request(
                    KIND,
                    IDENT,
                    f"SET {committed}",
                    sort=_sk(f"day#{day}"),
                    values={":zero": 0, ":delta": delta},
                )
            )
            writes.append(
                table.update_request(
                    KIND,
                    IDENT,
                    f"SET {counted}",
                    sort=_sk(f"day#{settlement.day}"),
                    values={":zero": 0, ":cost": settlement.cost_nanos},
                )
            )
    for index, line in enumerate(settlement.usage):
        last = index == len(settlement.usage) - 1  # the job counts once, for the model that ended it
        writes.append(
            table.update_request(
                KIND,
                IDENT,
                "ADD jobs :jobs, input_tokens :input, output_tokens :output, cost_nanos :cost"
                " SET #date = :date, #model = :model, #ttl = :ttl",
                sort=_sk(f"rollup#{settlement.day}#{line.model_id}"),
                names={"#date": "date", "#model": "model", "#ttl": "ttl"},
                values={
                    ":jobs": 1 if last else 0,
                    ":input": line.input_tokens,
                    ":output": line.output_tokens,
                    ":cost": line.cost_nanos,
                    ":date": settlement.day,
                    ":model": line.model_id,
                    ":ttl": now_ms // 1000 + ROLLUP_TTL_SECONDS,
                },
            )
        )
    return writes


def stale_settlement(failed: ConditionFailed, first: int, count: int) -> bool:
    """Whether a transaction failed on a condition of its settlement's entries (``count`` of them,
    from index ``first``): what the settlement was computed against moved meanwhile."""
    return any(code == "ConditionalCheckFailed" for code, _ in failed.reasons[first : first + count])


class DynamoUsageStore:
    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    def _get(self, sk: str) -> dict[str, Any] | None:
        return self._table.get(KIND, IDENT, sort=_sk(sk))

    def state(self, model_id: str | None, day: str) -> UsageState:
        keys = state_keys(self._table, model_id, day)
        return state_from(batch_get(self._table.client, {self._table.name: keys})[self._table.name], day)

    # ------------------------------------------------------------------ limits
    def limits(self) -> TenantLimits | None:
        item = self._get("limits")
        return _limits(item) if item else None

    def bucket_state(self) -> UsageState:
        keys = [self._table.key(KIND, IDENT, _sk(name)) for name in ("limits", "bucket#minute", "bucket#day")]
        return state_from(batch_get(self._table.client, {self._table.name: keys})[self._table.name], "")

    def count_spend(self, day: str) -> None:
        for _ in range(COUNT_ATTEMPTS):
            # the count first, then the rollups: a budgeted job settling in between changes the count,
            # and the write below, conditional on it, is tried again
            counted = int((self._get(f"day#{day}") or {}).get("counted_nanos", 0))
            settled = sum(row["cost_nanos"] for row in self.rollups(day, day))
            if settled <= counted:
                return
            try:
                self._table.update(
                    KIND,
                    IDENT,
                    "SET committed_nanos = if_not_exists(committed_nanos, :zero) + :uncounted,"
                    " counted_nanos = :settled",
                    sort=_sk(f"day#{day}"),
                    condition="attribute_not_exists(counted_nanos) OR counted_nanos = :counted",
                    values={
                        ":zero": 0,
                        ":uncounted": settled - counted,
                        ":settled": settled,
                        ":counted": counted,
                    },
                )
                return
            except ConditionFailed:
                continue
        raise Conflict(
            f"Could not count {day}'s spend: jobs kept settling meanwhile",
            suggestions=["Run the command again"],
        )

    def change_limits(
        self,
        previous: TenantLimits | None,
        limits: TenantLimits | None,
        moves: Sequence[Rescale],
        versions: Mapping[str, int],
    ) -> bool:
        condition, values = limits_condition(previous)
        writes = [
            self._table.put_request(KIND, IDENT, _limits_item(limits), condition=condition, values=values)
            if limits is not None
            else self._table.delete_request(
                KIND, IDENT, sort=_sk("limits"), condition=condition, values=values
            )
        ]
        writes += [_rescale_request(self._table, move) for move in moves]
        moved = {move.bucket for move in moves}
        for name, version in versions.items():
            if name not in moved:  # held on as read (a move holds on its own)
                held, entries = _scale_condition(version)
                writes.append(
                    self._table.check_request(KIND, IDENT, held, sort=_sk(f"bucket#{name}"), values=entries)
                )
        try:
            transact(self._table.client, writes)
        except ConditionFailed:
            return False
        return True

    # ------------------------------------------------------------------ learned statistics
    def stats(self, model_id: str) -> ModelStats:
        item = self._get(f"stats#{model_id}")
        if not item:
            return ModelStats()
        return ModelStats(
            correction_milli=int(item["correction_milli"]),
            samples=int(item.get("samples", 0)),
            version=int(item["version"]),
        )

    def save_stats(self, model_id: str, stats: ModelStats, expected_version: int) -> bool:
        attributes = {
            "sk": f"stats#{model_id}",
            "correction_milli": stats.correction_milli,
            "samples": stats.samples,
            "version": expected_version + 1,
        }
        condition = "attribute_not_exists(pk)" if expected_version == 0 else "version = :v"
        values = None if expected_version == 0 else {":v": expected_version}
        try:
            self._table.put(KIND, IDENT, attributes, condition=condition, values=values)
        except ConditionFailed:
            return False
        return True

    # ------------------------------------------------------------------ rollups
    def rollups(self, since: str, until: str) -> list[dict[str, Any]]:
        items = self._table.query(
            KIND,
            IDENT,
            sort_condition="sk BETWEEN :low AND :high",
            values={":low": f"rollup#{since}", ":high": f"rollup#{until}#~"},  # "~" sorts after model ids
        )
        return [
            {
                "date": item["date"],
                "model": item["model"],
                "jobs": int(item["jobs"]),
                "input_tokens": int(item["input_tokens"]),
                "output_tokens": int(item["output_tokens"]),
                "cost_nanos": int(item["cost_nanos"]),
            }
            for item in items
        ]
