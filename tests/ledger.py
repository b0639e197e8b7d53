"""An in-memory deployment of the jobs' storage: jobs, idempotency claims, chunk logs, usage and the
queue. Every operation runs under one lock and checks its conditions as the DynamoDB adapter's do, so
it is an atomic compare-and-set store: an exactly-once test that passes here proves something.

Faults are injected per operation (``Faults``): a crash before a write is applied, or after it was
applied with its reply lost (the caller sees an error, the store has the write)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spool_core.adapters.usage import BUCKETS, state_from
from spool_core.jobs.model import STORED, TERMINAL, Chunk, EndMark, Job, Progress, Segment, Status
from spool_core.jobs.ports import (
    AdmissionRefused,
    Claim,
    Conflict,
    EndGuard,
    JobEnd,
    LogPage,
    PendingJob,
    Signals,
)
from spool_core.limits.model import (
    Rescale,
    ReservationPlan,
    Settlement,
    SettlementStale,
    TenantLimits,
    UsageState,
)
from spool_core.limits.service import ModelStats
from spool_core.queue import JobMessage
from spool_core.units import now_ms


class ReplyLost(ConnectionError):
    """The write was applied; its reply never arrived."""


class Crash(BaseException):
    """Stands in for the process dying: nothing in Spool catches a BaseException."""


@dataclass
class Faults:
    """``plan[op]``: a list of what happens to the next calls of ``op``: ``"crash"`` (before the write),
    ``"lost"`` (applied, then the reply is lost), ``"crash_after"`` (applied, then the process dies),
    ``"error"`` (refused by the store itself, not by a condition), or None (normal)."""

    plan: dict[str, list[str | None]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)

    def next(self, op: str) -> str | None:
        self.seen.append(op)
        queue = self.plan.get(op)
        return queue.pop(0) if queue else None


class MemoryLedger:
    def __init__(self, clock_ms: Callable[[], int] = now_ms) -> None:
        self.lock = threading.RLock()
        self.clock_ms = clock_ms
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.claims: dict[tuple[str, str], Claim] = {}
        self.chunks: dict[tuple[str, str], dict[int, Chunk]] = {}
        self.usage: dict[str, dict[str, dict[str, Any]]] = {}
        self.messages: list[JobMessage] = []
        # Messages sent with a delay, with the time (ms) they become visible: as SQS's DelaySeconds.
        self.delayed: list[tuple[int, JobMessage]] = []
        self.faults = Faults()
        self.settlements: list[tuple[str, Settlement]] = []
        self.end_marks: dict[tuple[str, str], EndMark] = {}  # (tenant, job) -> its end mark
        self.live_end_marks: set[tuple[str, str]] = set()  # those of subscribed jobs (for the fanout)
        self.on_append: Callable[[], None] = lambda: None  # e.g. let time pass: a slow store

    def tenant(self, tenant_id: str) -> TenantLedger:
        return TenantLedger(self, tenant_id)

    # the queue
    def send(
        self,
        job_id: str,
        tenant_id: str,
        *,
        continuation: int = 0,
        stalled_at: int | None = None,
        circuit_wait_since_ms: int | None = None,
        delay_seconds: int = 0,
    ) -> None:
        message = JobMessage(
            job_id=job_id,
            tenant_id=tenant_id,
            continuation=continuation,
            stalled_at=stalled_at,
            circuit_wait_since_ms=circuit_wait_since_ms,
        )
        with self.lock:
            if delay_seconds > 0:
                self.delayed.append((self.clock_ms() + delay_seconds * 1000, message))
            else:
                self.messages.append(message)

    def waiting(self) -> int:
        """Messages a worker could receive now (a delayed one once its delay is over), as the SQS
        adapter counts them."""
        with self.lock:
            now = self.clock_ms()
            return len(self.messages) + sum(1 for at, _ in self.delayed if at <= now)

    def receive(self) -> JobMessage | None:
        with self.lock:
            now = self.clock_ms()
            due = [entry for entry in self.delayed if entry[0] <= now]
            self.delayed = [entry for entry in self.delayed if entry[0] > now]
            self.messages.extend(message for _, message in sorted(due, key=lambda entry: entry[0]))
            return self.messages.pop(0) if self.messages else None

    def next_visible_ms(self) -> int | None:
        """When the first delayed message becomes visible (None: none is delayed)."""
        with self.lock:
            return min((at for at, _ in self.delayed), default=None)

    # the sweeper's index
    def older_than(self, before_ms: int, limit: int) -> list[PendingJob]:
        with self.lock:
            pending = [
                PendingJob(tenant, job_id, int(item["pending_since_ms"]))
                for (tenant, job_id), item in self.jobs.items()
                if "pending_since_ms" in item and int(item["pending_since_ms"]) < before_ms
            ]
        return sorted(pending, key=lambda p: p.pending_since_ms)[:limit]

    def _apply(self, op: str, write: Callable[[], Any]) -> Any:
        """Run ``write`` under the lock, with the fault planned for ``op``."""
        fault = self.faults.next(op)
        if fault == "crash":
            raise Crash(f"crash before {op}")
        if fault == "error":
            raise RuntimeError(f"the store refused {op}")
        with self.lock:
            result = write()
        if fault == "lost":
            raise ReplyLost(f"{op} applied, reply lost")
        if fault == "crash_after":
            raise Crash(f"crash after {op}")
        return result


class TenantLedger:
    """One tenant's view: implements ``JobStore``, ``ChunkLog``, ``UsageStore`` and ``JobQueue``."""

    def __init__(self, ledger: MemoryLedger, tenant: str) -> None:
        self.ledger = ledger
        self.tenant_id = tenant

    @property
    def _usage(self) -> dict[str, dict[str, Any]]:
        return self.ledger.usage.setdefault(self.tenant_id, {})

    def _job(self, job_id: str) -> dict[str, Any] | None:
        return self.ledger.jobs.get((self.tenant_id, job_id))

    # ------------------------------------------------------------------ JobStore
    def get(self, job_id: str) -> Job | None:
        with self.ledger.lock:
            item = self._job(job_id)
            return Job.model_validate(item, context=STORED) if item else None

    def admission_state(self, key_hash: str, model_id: str, day: str) -> tuple[Claim | None, UsageState]:
        with self.ledger.lock:
            return self.ledger.claims.get((self.tenant_id, key_hash)), self.state(model_id or None, day)

    def admit(self, job: Job, claim: Claim, plan: ReservationPlan) -> None:
        def write() -> None:
            holder = self.ledger.claims.get((self.tenant_id, claim.key_hash))
            if holder is not None:
                raise AdmissionRefused(holder)
            usage = self._usage
            running = usage.get("concurrency", {}).get("running")
            ok = running is None or running < plan.max_running
            ok = ok and self.limits() == plan.limits_seen  # planned at the limits that still apply
            for take in plan.takes:
                tat = usage.get(f"bucket#{take.bucket}", {}).get("tat_us")
                # taken at the scale it was converted at (the bucket's scale version as read)
                ok = ok and usage.get(f"bucket#{take.bucket}", {}).get("rescales", 0) == take.version
                if take.rescale is not None:
                    ok = ok and tat == take.rescale.seen_tat
                elif take.kind == "restart":
                    ok = ok and (tat is None or tat <= take.now_us)
                else:
                    ok = ok and tat is not None and take.now_us < tat <= take.latest
            if plan.budget_room_nanos is not None:
                committed = usage.get(f"day#{plan.reservation.day}", {}).get("committed_nanos")
                ok = ok and (committed is None or committed <= plan.budget_room_nanos)
            if not ok:
                raise AdmissionRefused(None)
            assert self._job(job.job_id) is None
            self.ledger.claims[(self.tenant_id, claim.key_hash)] = claim
            self.ledger.jobs[(self.tenant_id, job.job_id)] = {
                **job.model_dump(exclude_none=True),
                "pending_since_ms": self.ledger.clock_ms(),
            }
            usage.setdefault("concurrency", {})["running"] = (running or 0) + 1
            for take in plan.takes:
                bucket = usage.setdefault(f"bucket#{take.bucket}", {})
                if take.rescale is not None:
                    apply_rescale(bucket, take.rescale)
                else:
                    bucket["tat_us"] = (
                        take.now_us + take.cost_us
                        if take.kind == "restart"
                        else bucket["tat_us"] + take.cost_us
                    )
                    bucket["scale"], bucket["scale_at"] = take.limit, take.version
            if plan.budget_room_nanos is not None:
                day = usage.setdefault(f"day#{plan.reservation.day}", {})
                day["committed_nanos"] = day.get("committed_nanos", 0) + plan.reservation.cost_nanos

        self.ledger._apply("admit", write)

    def withdraw(self, job: Job, claim: Claim, settlement: Settlement) -> None:
        def write() -> None:
            item = self._job(job.job_id)
            holder = self.ledger.claims.get((self.tenant_id, claim.key_hash))
            if not item or item["status"] != "queued" or item["attempts"] != 0 or not holder:
                raise Conflict(item)
            if holder.job_id != job.job_id:
                raise Conflict(item)
            self._check(settlement)
            del self.ledger.jobs[(self.tenant_id, job.job_id)]
            del self.ledger.claims[(self.tenant_id, claim.key_hash)]
            self._settle(settlement)

        self.ledger._apply("withdraw", write)

    def take_lease(self, job_id: str, token: str, now_ms: int, until_ms: int) -> Job:
        def write() -> Job:
            item = self._job(job_id)
            if (
                item is None
                or item["status"] not in {"queued", "running"}
                or item.get("lease_expires_ms", 0) >= now_ms
            ):
                if item is not None and item.get("lease_token") == token:
                    return Job.model_validate(item, context=STORED)
                raise Conflict(item)
            item.update(
                status="running",
                lease_token=token,
                lease_expires_ms=until_ms,
                attempts=item.get("attempts", 0) + 1,
                pending_since_ms=now_ms,
            )
            item.pop("dead_lettered_ms", None)  # an attempt since: its dead letters start anew
            item.setdefault("started_at", "2026-01-01T00:00:00.000Z")
            return Job.model_validate(item, context=STORED)

        result: Job = self.ledger._apply("take_lease", write)
        return result

    def _held(self, job_id: str, token: str) -> dict[str, Any]:
        item = self._job(job_id)
        if item is None or item.get("lease_token") != token or item["status"] != "running":
            raise Conflict(item)
        return item

    def renew_lease(
        self, job_id: str, token: str, until_ms: int, progress: Progress, first_token_at: str | None
    ) -> None:
        def write() -> None:
            item = self._held(job_id, token)
            item.update(
                lease_expires_ms=until_ms,
                progress=progress.model_dump(),
                pending_since_ms=self.ledger.clock_ms(),
            )
            if first_token_at:
                item["first_token_at"] = first_token_at

        self.ledger._apply("renew_lease", write)

    def hand_over(self, job_id: str, token: str, progress: Progress, input_reported: dict[str, int]) -> None:
        def write() -> None:
            item = self._held(job_id, token)
            item.update(
                lease_expires_ms=0,
                progress=progress.model_dump(),
                input_reported=dict(input_reported),
                pending_since_ms=self.ledger.clock_ms(),
            )

        self.ledger._apply("hand_over", write)

    def switch_model(self, job_id: str, token: str, segment: Segment, input_reported: dict[str, int]) -> Job:
        def write() -> Job:
            item = self._job(job_id)
            if item and item.get("lease_token") == token and item.get("model_resolved") == segment.model:
                return Job.model_validate(item, context=STORED)
            item = self._held(job_id, token)
            item.update(model_resolved=segment.model, fallback_used=True, input_reported=dict(input_reported))
            item["segments"] = [*item.get("segments", []), segment.model_dump()]
            return Job.model_validate(item, context=STORED)

        result: Job = self.ledger._apply("switch_model", write)
        return result

    def end(self, job_id: str, end: JobEnd, guard: EndGuard, settlement: Settlement) -> Job:
        def write() -> Job:
            item = self._job(job_id)
            if item is not None and item.get("ended_by") == guard.token:
                return Job.model_validate(item, context=STORED)
            if item is None:
                raise Conflict(None)
            if guard.kind == "lease":
                holds = item.get("lease_token") == guard.token and item["status"] == "running"
            elif guard.kind == "queued":
                holds = item["status"] == "queued"
            else:
                holds = (
                    item["status"] in {"queued", "running"} and item.get("lease_expires_ms", 0) < guard.now_ms
                )
            if not holds:
                raise Conflict(dict(item))
            self._check(settlement)
            changes: dict[str, Any] = {
                "status": end.status,
                "progress": end.progress.model_dump(),
                "usage": end.usage.model_dump(),
                "cost_nanos": end.cost_nanos,
                "completed_at": end.completed_at,
                "input_reported": dict(end.input_reported),
                "lease_expires_ms": 0,
                "ended_by": guard.token,
            }
            for name in ("output", "error", "first_token_at", "finish_reason"):
                if getattr(end, name) is not None:
                    changes[name] = getattr(end, name)
            if end.segments is not None:
                changes["segments"] = [s.model_dump() for s in end.segments]
            item.update(changes)
            item.pop("pending_since_ms", None)
            # As the store does, atomically with the end: the end mark, live if the job is subscribed.
            self.ledger.end_marks[(self.tenant_id, job_id)] = EndMark.of(
                Job.model_validate(item, context=STORED)
            )
            if item.get("subscribed"):
                self.ledger.live_end_marks.add((self.tenant_id, job_id))
            self._settle(settlement)
            self.ledger.settlements.append((self.tenant_id, settlement))
            return Job.model_validate(item, context=STORED)

        result: Job = self.ledger._apply("end", write)
        return result

    def _check(self, settlement: Settlement) -> None:
        """As the store's conditions: each moved bucket's scale version, and the refund counter of
        each whose refund counted on its place."""
        bounds = dict(settlement.refund_bounds)
        for name, operator, tat in settlement.tat_guards:
            current = self._usage.get(f"bucket#{name}", {}).get("tat_us")
            if current is None or (current > tat if operator == "<=" else current != tat):
                raise SettlementStale()
        for name, seen in settlement.rescales_seen:
            bucket = self._usage.get(f"bucket#{name}", {})
            if bucket.get("rescales", 0) != seen or bucket.get("refunded_us", 0) > bounds.get(
                name, bucket.get("refunded_us", 0)
            ):
                raise SettlementStale()

    def _settle(self, settlement: Settlement) -> None:
        usage = self._usage
        now_us = self.ledger.clock_ms() * 1000
        for name, delta in settlement.bucket_deltas:
            bucket = usage.setdefault(f"bucket#{name}", {})
            bucket["tat_us"] = bucket.get("tat_us", now_us) + delta
            if delta < 0:
                bucket["refunded_us"] = bucket.get("refunded_us", 0) - delta
        if settlement.release_slot:
            slot = usage.setdefault("concurrency", {})
            slot["running"] = slot.get("running", 1) - 1
        if settlement.budget is not None:
            day = usage.setdefault(f"day#{settlement.budget[0]}", {})
            day["committed_nanos"] = day.get("committed_nanos", 0) + settlement.budget[1]
            settled = usage.setdefault(f"day#{settlement.day}", {})  # the rollups' day
            settled["counted_nanos"] = settled.get("counted_nanos", 0) + settlement.cost_nanos
        for index, line in enumerate(settlement.usage):
            rollup = usage.setdefault(
                f"rollup#{settlement.day}#{line.model_id}",
                {
                    "date": settlement.day,
                    "model": line.model_id,
                    "jobs": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "cost_nanos": 0,
                },
            )
            rollup["jobs"] += 1 if index == len(settlement.usage) - 1 else 0
            rollup["input_tokens"] += line.input_tokens
            rollup["output_tokens"] += line.output_tokens
            rollup["cost_nanos"] += line.cost_nanos

    def request_cancel(self, job_id: str) -> Job:
        def write() -> Job:
            item = self._job(job_id)
            if item is None or item["status"] != "running":
                raise Conflict(item)
            item["cancel_requested"] = True
            return Job.model_validate(item, context=STORED)

        result: Job = self.ledger._apply("request_cancel", write)
        return result

    def signals(self, job_id: str) -> Signals:
        with self.ledger.lock:
            item = self._job(job_id) or {}
            return Signals(cancel=bool(item.get("cancel_requested")), subscribed=bool(item.get("subscribed")))

    def mark_subscribed(self, job_id: str) -> Job:
        def write() -> Job:
            item = self._job(job_id)
            if item is None:
                raise Conflict(None)
            if item["status"] not in TERMINAL:
                item["subscribed"] = True
            return Job.model_validate(item, context=STORED)

        result: Job = self.ledger._apply("mark_subscribed", write)
        return result

    def status(self, job_id: str) -> Status | None:
        with self.ledger.lock:
            item = self._job(job_id)
            return item["status"] if item else None

    def requeue(self, job_id: str, seen_pending_ms: int, now_ms: int) -> bool:
        def write() -> bool:
            item = self._job(job_id)
            if (
                item is None
                or item.get("pending_since_ms") != seen_pending_ms
                or item["status"] not in {"queued", "running"}
            ):
                return False
            item["pending_since_ms"] = now_ms
            return True

        result: bool = self.ledger._apply("requeue", write)
        return result

    def dead_lettered_since(self, job_id: str, now_ms: int) -> int:
        def write() -> int:
            item = self._job(job_id)
            if (
                item is None
                or item["status"] not in {"queued", "running"}
                or "lease_expires_ms" not in item  # DynamoDB's ``<`` on a missing attribute is false
                or item["lease_expires_ms"] >= now_ms
            ):
                raise Conflict(item)
            item["pending_since_ms"] = now_ms
            return int(item.setdefault("dead_lettered_ms", now_ms))

        result: int = self.ledger._apply("dead_lettered_since", write)
        return result

    # ------------------------------------------------------------------ ChunkLog
    def append(self, job_id: str, chunk: Chunk) -> None:
        self.ledger.on_append()

        def write() -> None:
            log = self.ledger.chunks.setdefault((self.tenant_id, job_id), {})
            current = log.get(chunk.sequence_id)
            if current is not None:
                if current.writer == chunk.writer and current.text == chunk.text:
                    return
                raise Conflict(current.model_dump())
            log[chunk.sequence_id] = chunk

        self.ledger._apply("append", write)

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        with self.ledger.lock:
            log = self.ledger.chunks.get((self.tenant_id, job_id), {})
            return [log[seq] for seq in sorted(log) if seq > after][:limit]

    def page(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> LogPage:
        with self.ledger.lock:
            chunks = self.after(job_id, after, limit + 1)
            end = self.ledger.end_marks.get((self.tenant_id, job_id))
            return LogPage(chunks[:limit], end if end is not None and len(chunks) <= limit else None)

    def last(self, job_id: str) -> Chunk | None:
        with self.ledger.lock:
            log = self.ledger.chunks.get((self.tenant_id, job_id), {})
            return log[max(log)] if log else None

    def all(self, job_id: str) -> Iterator[Chunk]:
        return iter(self.after(job_id, 0, 10**9))

    # ------------------------------------------------------------------ UsageStore
    def state(self, model_id: str | None, day: str) -> UsageState:
        """As the store reads the same items (``adapters.usage.state_from``)."""
        with self.ledger.lock:
            wanted = {"limits", "concurrency", f"day#{day}", f"stats#{model_id}"}
            wanted |= {f"bucket#{name}" for name in BUCKETS}
            items = [{**item, "sk": sk} for sk, item in self._usage.items() if sk in wanted]
            return state_from(items, day)

    def stats(self, model_id: str) -> ModelStats:
        with self.ledger.lock:
            item = self._usage.get(f"stats#{model_id}")
            if not item:
                return ModelStats()
            return ModelStats(item["correction_milli"], item["samples"], item["version"])

    def save_stats(self, model_id: str, stats: ModelStats, expected_version: int) -> bool:
        with self.ledger.lock:
            current = self._usage.get(f"stats#{model_id}")
            if (current["version"] if current else 0) != expected_version:
                return False
            self._usage[f"stats#{model_id}"] = {
                "correction_milli": stats.correction_milli,
                "samples": stats.samples,
                "version": expected_version + 1,
            }
            return True

    def rollups(self, since: str, until: str) -> list[dict[str, Any]]:
        with self.ledger.lock:
            return [
                dict(item)
                for sk, item in sorted(self._usage.items())
                if sk.startswith("rollup#") and since <= item["date"] <= until
            ]

    def bucket_state(self) -> UsageState:
        return self.state(None, "")

    def limits(self) -> TenantLimits | None:
        with self.ledger.lock:
            item = self._usage.get("limits")
            return TenantLimits(**item) if item else None

    def _set_limits(self, limits: TenantLimits) -> None:
        with self.ledger.lock:
            self._usage["limits"] = {
                "tokens_per_minute": limits.tokens_per_minute,
                "tokens_per_day": limits.tokens_per_day,
                "max_concurrent_jobs": limits.max_concurrent_jobs,
                "daily_budget_nanos": limits.daily_budget_nanos,
            }

    def count_spend(self, day: str) -> None:
        with self.ledger.lock:
            item = self._usage.setdefault(f"day#{day}", {})
            settled = sum(r["cost_nanos"] for sk, r in self._usage.items() if sk.startswith(f"rollup#{day}#"))
            uncounted = settled - item.get("counted_nanos", 0)
            if uncounted > 0:
                item["committed_nanos"] = item.get("committed_nanos", 0) + uncounted
                item["counted_nanos"] = settled

    def change_limits(
        self,
        previous: TenantLimits | None,
        limits: TenantLimits | None,
        moves: Sequence[Rescale],
        versions: Mapping[str, int],
    ) -> bool:
        with self.ledger.lock:
            current = self.limits()
            same = (
                (current is None)
                if previous is None
                else (current is not None and current[:2] == previous[:2])
            )
            buckets = [self._usage.get(f"bucket#{move.bucket}", {}) for move in moves]
            if not same or any(
                b.get("tat_us") != move.seen_tat or b.get("rescales", 0) != move.version
                for b, move in zip(buckets, moves, strict=True)
            ):
                return False
            if any(self._usage.get(f"bucket#{n}", {}).get("rescales", 0) != v for n, v in versions.items()):
                return False
            for bucket, move in zip(buckets, moves, strict=True):
                apply_rescale(bucket, move)
            for move, bucket in zip(moves, buckets, strict=True):
                self._usage[f"bucket#{move.bucket}"] = bucket
            if limits is None:
                self._usage.pop("limits", None)
            else:
                self._set_limits(limits)
            return True

    # ------------------------------------------------------------------ JobQueue
    def send(
        self,
        job_id: str,
        tenant_id: str,
        *,
        continuation: int = 0,
        stalled_at: int | None = None,
        circuit_wait_since_ms: int | None = None,
        delay_seconds: int = 0,
    ) -> None:
        fault = self.ledger.faults.next("send")
        if fault == "crash":
            raise Crash("crash before send")
        if fault == "fail":
            raise ConnectionError("the queue is unreachable")
        self.ledger.send(
            job_id,
            tenant_id,
            continuation=continuation,
            stalled_at=stalled_at,
            circuit_wait_since_ms=circuit_wait_since_ms,
            delay_seconds=delay_seconds,
        )
        if fault == "crash_after":
            raise Crash("crash after send")

    def waiting(self) -> int:
        return self.ledger.waiting()


def apply_rescale(bucket: dict[str, Any], move: Rescale) -> None:
    """As the store applies a rescale: the TAT (when something is outstanding), the scale, the
    counters."""
    if move.tat is not None:
        bucket["tat_us"] = move.tat
    bucket["scale"], bucket["scale_at"] = move.limit, move.version + 1
    bucket["rescales"] = bucket.get("rescales", 0) + 1
    bucket["lowerings"] = bucket.get("lowerings", 0) + move.lowered


def running(ledger: MemoryLedger, tenant: str) -> int:
    return int(ledger.usage.get(tenant, {}).get("concurrency", {}).get("running", 0))


__all__ = ["Crash", "Faults", "MemoryLedger", "ReplyLost", "TenantLedger", "replace", "running"]


class Clock:
    """Time that moves only when a test says so (or by ``step`` at each reading)."""

    def __init__(self, now: float = 1_800_000_000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


class JobWorld:
    """The jobs logic wired to one in-memory deployment: services, runners and the queue."""

    def __init__(self, *, limits: TenantLimits | None = None, faults_enabled: bool = True) -> None:
        from spool_core.circuits import CircuitBreaker
        from spool_core.contexts.service import ContextLimits, ContextService
        from spool_core.models import ModelCatalog, registry
        from spool_core.providers.simulated import SimulatedProvider
        from tests.fakes import (
            MemoryBlobIndex,
            MemoryBlobStore,
            MemoryCircuitStore,
            MemoryContextTable,
            MemoryManifestStore,
            MemoryRequestStore,
            MemoryUploadStore,
        )

        self._new_request_store = MemoryRequestStore
        self.clock = Clock()
        self.ledger = MemoryLedger(clock_ms=self.clock.ms)
        self.limits = limits or TenantLimits(200_000, 10_000_000, 16)
        self.catalog = ModelCatalog(registry(), None, None)
        self.circuits = MemoryCircuitStore()
        self.breaker = CircuitBreaker(self.circuits, clock=self.clock)
        self.provider_calls: list[str] = []
        self._contexts = ContextService(
            MemoryContextTable(),
            MemoryManifestStore(),
            MemoryBlobStore(),
            MemoryBlobIndex(),
            MemoryUploadStore(),
            ContextLimits(),
            self.clock,
        )
        self.context_stores_made = 0  # how often the services made the tenant's context store
        self.requests: dict[str, MemoryRequestStore] = {}  # each tenant's messages too large for an item

        world = self

        class Counted(SimulatedProvider):
            """The simulated provider, each call (a stream asked for) counted in ``provider_calls``."""

            def __init__(self, model_id: str) -> None:
                super().__init__(faults_enabled=faults_enabled, sleep=lambda _: None, crash=world._crash)
                self.model_id = model_id

            def stream(self, request: Any, resume: Any) -> Any:
                world.provider_calls.append(self.model_id)
                return super().stream(request, resume)

        def provider(model: Any) -> SimulatedProvider:
            return Counted(model.id)

        self.provider_for = provider

    @staticmethod
    def _crash() -> None:
        raise Crash("the provider's process died")

    def limiter(self, tenant: str) -> Any:
        from spool_core.limits.service import RateLimiter

        return RateLimiter(self.ledger.tenant(tenant), self.limits, clock_ms=self.clock.ms)

    def _context_store(self) -> Any:
        self.context_stores_made += 1
        return self._contexts

    def request_store(self, tenant: str) -> Any:
        return self.requests.setdefault(tenant, self._new_request_store())

    def service(self, tenant: str = "acme") -> Any:
        from spool_core.jobs.service import JobService
        from spool_core.tenancy import Tenant

        store = self.ledger.tenant(tenant)
        return JobService(
            Tenant(tenant),
            store,
            store,
            store,
            self._context_store,
            self.catalog,
            self.limiter(tenant),
            clock=self.clock,
            sleep=lambda _: None,
            requests=lambda: self.request_store(tenant),
        )

    def runner(self, tenant: str = "acme", **settings: Any) -> Any:
        """The worker's runner; ``flush_tokens`` / ``flush_ms`` / ``flush_max_ms`` set its cadence."""
        from spool_core.jobs.runner import JobRunner, RunnerSettings

        store = self.ledger.tenant(tenant)
        config = {"lease_ms": 30_000, "backoff_seconds": 0.0, **cadence_setting(settings)}
        return JobRunner(
            store,
            store,
            self._context_store,
            self.catalog,
            self.provider_for,
            self.limiter(tenant),
            RunnerSettings(**config),
            queue=store,
            breaker=self.breaker,
            requests=lambda: self.request_store(tenant),
            clock=self.clock,
            sleep=lambda _: None,
        )

    def dead_letters(self, tenant: str = "acme") -> Any:
        from spool_core.jobs.dead_letters import DeadLetters

        store = self.ledger.tenant(tenant)
        return DeadLetters(store, store, self.catalog, self.limiter(tenant), clock=self.clock)

    def sweeper(self, **settings: Any) -> Any:
        from spool_core.jobs.sweeper import Sweeper, SweepSettings

        return Sweeper(
            self.ledger,
            self.ledger.tenant,
            self.ledger.tenant("system"),
            SweepSettings(**settings),
            clock=self.clock,
        )

    def drain(self, *, lease_ms: int = 30_000, rounds: int = 50, **runner: Any) -> list[str]:
        """Deliver every queued message until the queue is empty, as SQS and Lambda would: a message
        whose invocation crashed or asked to retry comes back once the lease has run out."""
        outcomes = []
        for _ in range(rounds):
            message = self.ledger.receive()
            if message is None:
                visible_at = self.ledger.next_visible_ms()
                if visible_at is None:
                    return outcomes
                self.clock.now = max(self.clock.now, visible_at / 1000)  # a delayed message's time comes
                continue
            try:
                outcome = (
                    self.runner(message.tenant_id, lease_ms=lease_ms, **runner)
                    .run(
                        message.job_id,
                        continuation=message.continuation,
                        stalled_at=message.stalled_at,
                        circuit_wait_since_ms=message.circuit_wait_since_ms,
                    )
                    .value
                )
            except (Crash, ReplyLost, RuntimeError) as exc:
                outcome = f"failed: {exc}"
            outcomes.append(outcome)
            if outcome not in {"done", "yield"}:
                self.clock.now += lease_ms / 1000 + 1  # the visibility timeout (= the lease) passes
                self.ledger.send(
                    message.job_id,
                    message.tenant_id,
                    continuation=message.continuation,
                    stalled_at=message.stalled_at,
                    circuit_wait_since_ms=message.circuit_wait_since_ms,
                )
        raise AssertionError(f"the queue did not drain: {outcomes}")


def cadence_setting(settings: dict[str, Any]) -> dict[str, Any]:
    """``RunnerSettings`` keywords, with ``flush_tokens`` / ``flush_ms`` / ``flush_max_ms`` made a Cadence."""
    from spool_core.jobs.cadence import Cadence

    rest = dict(settings)
    names = {"flush_tokens": "tokens", "flush_ms": "first_ms", "flush_max_ms": "max_ms"}
    chosen = {field: rest.pop(name) for name, field in names.items() if name in rest}
    if chosen:
        rest["cadence"] = Cadence(**chosen)
    return rest
