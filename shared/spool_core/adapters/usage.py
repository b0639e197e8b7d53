"""The usage table: one partition per tenant holding its buckets, concurrency counter, budget,
learned statistics and daily rollups (sort keys ``bucket#``, ``concurrency``, ``day#``, ``stats#``,
``rollup#<date>#<model>``, ``limits``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable
from spool_core.limits.model import Bucket, Settlement, TenantLimits
from spool_core.limits.service import ModelStats

KIND = "usage"
IDENT = "tenant"
ROLLUP_TTL_SECONDS = 400 * 86_400


def _sk(value: str) -> dict[str, str]:
    return {"sk": value}


class DynamoUsageStore:
    def __init__(self, table: ScopedTable, clock: Any) -> None:
        self._table = table
        self._clock = clock

    def _get(self, sk: str) -> dict[str, Any] | None:
        return self._table.get(KIND, IDENT, sort=_sk(sk))

    def _update(
        self, sk: str, expression: str, condition: str | None = None, **values: Any
    ) -> dict[str, Any]:
        return self._table.update(
            KIND,
            IDENT,
            expression,
            sort=_sk(sk),
            condition=condition,
            values={f":{k}": v for k, v in values.items()},
        )

    # ------------------------------------------------------------------ limits
    def limits(self) -> TenantLimits | None:
        item = self._get("limits")
        if not item:
            return None
        return TenantLimits(
            tokens_per_minute=int(item["tokens_per_minute"]),
            tokens_per_day=int(item["tokens_per_day"]),
            max_concurrent_jobs=int(item["max_concurrent_jobs"]),
            daily_budget_usd=item.get("daily_budget_usd"),
        )

    def set_limits(self, limits: TenantLimits) -> None:
        attributes: dict[str, Any] = {
            "sk": "limits",
            "tokens_per_minute": limits.tokens_per_minute,
            "tokens_per_day": limits.tokens_per_day,
            "max_concurrent_jobs": limits.max_concurrent_jobs,
        }
        if limits.daily_budget_usd is not None:
            attributes["daily_budget_usd"] = limits.daily_budget_usd
        self._table.put(KIND, IDENT, attributes)

    # ------------------------------------------------------------------ token buckets (GCRA)
    def tat(self, bucket: Bucket) -> float | None:
        item = self._get(f"bucket#{bucket.name}")
        return float(item["tat"]) if item and "tat" in item else None

    def take(self, bucket: Bucket, tokens: int, now: float) -> tuple[bool, float | None]:
        """One conditional write per attempt, never a read-modify-write: either the bucket is not
        full (TAT in the future: advance it if it stays within the burst) or it is full (TAT in the
        past: restart it from now)."""
        cost = tokens * bucket.interval
        tat: float | None = None
        if tokens > bucket.limit:
            return False, self.tat(bucket)
        for _ in range(8):
            try:
                item = self._update(
                    f"bucket#{bucket.name}",
                    "SET tat = tat + :cost",
                    "tat > :now AND tat <= :latest",
                    cost=cost,
                    now=now,
                    latest=now + bucket.period - cost,
                )
                return True, float(item["tat"])
            except ConditionFailed as failed:
                tat = float(failed.item["tat"]) if failed.item and "tat" in failed.item else None
            if tat is not None and tat > now:
                return False, tat  # not enough tokens left
            try:
                item = self._update(
                    f"bucket#{bucket.name}",
                    "SET tat = :start",
                    "attribute_not_exists(tat) OR tat <= :now",
                    start=now + cost,
                    now=now,
                )
                return True, float(item["tat"])
            except ConditionFailed:
                continue  # another admission moved it meanwhile: look again
        return False, tat

    def give_back(self, bucket: Bucket, tokens: int) -> None:
        with contextlib.suppress(ConditionFailed):
            self._update(
                f"bucket#{bucket.name}",
                "SET tat = tat - :cost",
                "attribute_exists(tat)",
                cost=tokens * bucket.interval,
            )

    # ------------------------------------------------------------------ concurrency
    def acquire_slot(self, maximum: int) -> tuple[bool, int]:
        try:
            item = self._update(
                "concurrency",
                "SET running = if_not_exists(running, :zero) + :one",
                "attribute_not_exists(running) OR running < :max",
                zero=0,
                one=1,
                max=maximum,
            )
        except ConditionFailed as failed:
            return False, int((failed.item or {}).get("running", 0))
        return True, int(item["running"])

    def release_slot(self) -> None:
        with contextlib.suppress(ConditionFailed):  # never below zero
            self._update("concurrency", "SET running = running - :one", "running > :zero", one=1, zero=0)

    def running(self) -> int:
        item = self._get("concurrency")
        return int(item["running"]) if item else 0

    # ------------------------------------------------------------------ budget
    def commit_budget(self, day: str, cost_usd: float, budget_usd: float) -> tuple[bool, float]:
        try:
            item = self._update(
                f"day#{day}",
                "SET committed_usd = if_not_exists(committed_usd, :zero) + :cost",
                "attribute_not_exists(committed_usd) OR committed_usd <= :room",
                zero=0,
                cost=cost_usd,
                room=budget_usd - cost_usd,
            )
        except ConditionFailed as failed:
            return False, float((failed.item or {}).get("committed_usd", 0.0))
        if budget_usd < cost_usd:  # the condition admits a first commit above the budget on an empty day
            self.uncommit_budget(day, cost_usd)
            return False, float(item["committed_usd"]) - cost_usd
        return True, float(item["committed_usd"])

    def uncommit_budget(self, day: str, cost_usd: float) -> None:
        self._update(
            f"day#{day}",
            "SET committed_usd = if_not_exists(committed_usd, :zero) - :cost",
            zero=0,
            cost=cost_usd,
        )

    def committed(self, day: str) -> float:
        item = self._get(f"day#{day}")
        return float(item.get("committed_usd", 0.0)) if item else 0.0

    # ------------------------------------------------------------------ learned statistics
    def stats(self, model_id: str) -> ModelStats:
        item = self._get(f"stats#{model_id}")
        if not item:
            return ModelStats()
        return ModelStats(
            correction=float(item["correction"]),
            outputs=[int(x) for x in item.get("outputs", [])],
            samples=int(item.get("samples", 0)),
            version=int(item["version"]),
        )

    def save_stats(self, model_id: str, stats: ModelStats, expected_version: int) -> bool:
        attributes = {
            "sk": f"stats#{model_id}",
            "correction": stats.correction,
            "outputs": stats.outputs,
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

    # ------------------------------------------------------------------ settlement
    def settlement_writes(self, settlement: Settlement, buckets: Sequence[Bucket]) -> list[dict[str, Any]]:
        """Transaction entries that replace the reservation with the actual usage: they go in the same
        transaction as the job's final write, so they happen exactly once."""
        now = self._clock()
        delta_tokens = settlement.actual_tokens - settlement.reserved_tokens
        writes = [
            self._table.update_request(
                KIND,
                IDENT,
                "SET tat = if_not_exists(tat, :now) + :delta",
                sort=_sk(f"bucket#{bucket.name}"),
                values={":now": now, ":delta": delta_tokens * bucket.interval},
            )
            for bucket in buckets
        ]
        writes.append(
            self._table.update_request(
                KIND,
                IDENT,
                "SET running = if_not_exists(running, :one) - :one",
                sort=_sk("concurrency"),
                values={":one": 1},
            )
        )
        writes.append(
            self._table.update_request(
                KIND,
                IDENT,
                "SET committed_usd = if_not_exists(committed_usd, :zero) + :delta",
                sort=_sk(f"day#{settlement.reserved_day}"),
                values={":zero": 0, ":delta": settlement.cost_usd - settlement.reserved_cost_usd},
            )
        )
        writes.append(
            self._table.update_request(
                KIND,
                IDENT,
                "ADD jobs :one, input_tokens :input, output_tokens :output, cost_usd :cost"
                " SET #date = :date, #model = :model, #ttl = :ttl",
                sort=_sk(f"rollup#{settlement.day}#{settlement.model_id}"),
                names={"#date": "date", "#model": "model", "#ttl": "ttl"},
                values={
                    ":one": 1,
                    ":input": settlement.input_tokens,
                    ":output": settlement.output_tokens,
                    ":cost": settlement.cost_usd,
                    ":date": settlement.day,
                    ":model": settlement.model_id,
                    ":ttl": int(now + ROLLUP_TTL_SECONDS),
                },
            )
        )
        return writes

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
                "cost_usd": round(float(item["cost_usd"]), 8),
            }
            for item in items
        ]
