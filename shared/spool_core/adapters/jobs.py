"""The jobs' DynamoDB and SQS adapters, bound to one tenant's scope.

Every conditional write here is safe to retry after a reply was lost (botocore retries timeouts and
5xx, and a write may have been applied before its reply went missing): when a condition fails, the
item that came back is checked for the caller's own mark (the job id in the idempotency record, the
lease token on the job, the writer on a chunk, ``ended_by`` on an ended job), and a write found
already applied is success.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from spool_core.adapters.dynamodb import (
    ConditionFailed,
    ScopedTable,
    ShardedIndex,
    batch_get,
    transact,
)
from spool_core.adapters.listing import (
    LIST_INDEX,
    LIST_KEY,
    LIST_POSITION,
    STATUS_INDEX,
    STATUS_KEY,
    list_attributes,
    query_index,
    status_key,
)
from spool_core.adapters.usage import (
    reservation_writes,
    settlement_writes,
    stale_settlement,
    state_from,
    state_keys,
)
from spool_core.errors import DependencyUnavailable
from spool_core.jobs.model import (
    END_SEQUENCE_ID,
    MAX_SEQUENCE_ID,
    STORED,
    Chunk,
    EndMark,
    Job,
    JobSummary,
    Progress,
    Segment,
    Status,
)
from spool_core.jobs.ports import (
    AdmissionRefused,
    Claim,
    Conflict,
    EndGuard,
    JobEnd,
    ListedJob,
    LogPage,
    PendingJob,
    Signals,
)
from spool_core.limits.model import ReservationPlan, Settlement, SettlementStale, UsageState
from spool_core.listing import position
from spool_core.queue import JobMessage
from spool_core.tenancy import TenantScope
from spool_core.units import now_ms

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_sqs import SQSClient

TRANSACTION_ATTEMPTS = 5  # a transaction cancelled only because another one held an item is retried
JOB_KIND = "job"
IDEMPOTENCY_KIND = "idem"
PENDING = ShardedIndex("PendingIndex", "pending", 4, "pending_shard", "pending_since_ms")
_NO_INDEX = {"ValidationException", "ResourceNotFoundException"}
_RUNNING = {":running": "running"}
# When the job's dead letters were first received since its last lease was taken (dead_letters.py).
DEAD_LETTERED = "dead_lettered_ms"
_HELD = "#lease_token = :me AND #status = :running"  # only the attempt holding the lease may write


def pending_shard(job_id: str) -> str:
    """Pending jobs are spread over a few index partitions, so the index has no single hot key."""
    return PENDING.shard(job_id)


def _stored_job(item: Mapping[str, Any]) -> Job:
    """A job item as stored: its request may hold no messages (``Job.messages_blob`` names them)."""
    return Job.model_validate(item, context=STORED)


class DynamoJobStore:
    def __init__(
        self, jobs: ScopedTable, usage: ScopedTable, job_ttl_seconds: int, chunks: ScopedTable | None = None
    ) -> None:
        self._table = jobs
        self._usage = usage
        self._job_ttl = job_ttl_seconds
        self._chunks = chunks  # where a subscribed job's end mark goes (with its end)

    def get(self, job_id: str) -> Job | None:
        item = self._table.get(JOB_KIND, job_id)
        return _stored_job(item) if item else None

    def list_for_tenant(self, status: Status | None, limit: int, before: str | None) -> list[ListedJob]:
        """One Query of the list index (every status) or of the status index (one status)."""
        if status is None:
            items = query_index(self._table, LIST_INDEX, LIST_KEY, self._table.scope.tenant.id, limit, before)
        else:
            key = status_key(self._table, status)
            try:
                items = query_index(self._table, STATUS_INDEX, STATUS_KEY, key, limit, before)
            except ClientError as exc:
                # DynamoDB answers ValidationException for an index it lacks (moto ResourceNotFound).
                if exc.response.get("Error", {}).get("Code") not in _NO_INDEX:
                    raise
                # Not deployed yet (JobsStatusIndex=disabled), or still backfilling after it was enabled.
                raise DependencyUnavailable(
                    "Listing jobs by status is not available yet on this deployment",
                    details={"index": STATUS_INDEX},
                    suggestions=[
                        "List without status (GET /v1/jobs) and filter the entries by their status",
                        "Operators: deploy with JobsStatusIndex=enabled and wait for the index to be ACTIVE",
                    ],
                ) from exc
        return [ListedJob(str(item[LIST_POSITION]), JobSummary.model_validate(item)) for item in items]

    # ------------------------------------------------------------------ admission
    def admission_state(self, key_hash: str, model_id: str, day: str) -> tuple[Claim | None, UsageState]:
        found = batch_get(
            self._table.client,
            {
                self._table.name: [self._table.key(IDEMPOTENCY_KIND, key_hash)],
                self._usage.name: state_keys(self._usage, model_id or None, day),
            },
        )
        claims = found[self._table.name]
        return (_claim(key_hash, claims[0]) if claims else None), state_from(found[self._usage.name], day)

    def admit(self, job: Job, claim: Claim, plan: ReservationPlan) -> None:
        record = {
            "job_id": claim.job_id,
            "fingerprint": claim.fingerprint,
            "created_at": claim.created_at,
            "ttl": claim.expires_at_s,
        }
        writes = [
            self._table.put_request(
                IDEMPOTENCY_KIND, claim.key_hash, record, condition="attribute_not_exists(pk)"
            ),
            self._table.put_request(
                JOB_KIND, job.job_id, self._item(job), condition="attribute_not_exists(pk)"
            ),
            *reservation_writes(self._usage, plan),
        ]
        try:
            transact(self._table.client, writes)
        except ConditionFailed as failed:
            code, current = failed.reasons[0] if failed.reasons else ("None", None)
            holder = _claim(claim.key_hash, current) if code == "ConditionalCheckFailed" and current else None
            raise AdmissionRefused(holder) from None

    def withdraw(self, job: Job, claim: Claim, settlement: Settlement) -> None:
        writes = [
            self._table.delete_request(
                JOB_KIND,
                job.job_id,
                condition="#status = :queued AND attempts = :zero",
                names={"#status": "status"},
                values={":queued": "queued", ":zero": 0},
            ),
            self._table.delete_request(
                IDEMPOTENCY_KIND, claim.key_hash, condition="job_id = :job", values={":job": job.job_id}
            ),
            *settlement_writes(self._usage, settlement, now_ms()),
        ]
        try:
            transact(self._table.client, writes)
        except ConditionFailed as failed:
            job_or_claim = any(code == "ConditionalCheckFailed" for code, _ in failed.reasons[:2])
            if not job_or_claim and stale_settlement(failed, 2, len(writes) - 2):
                raise SettlementStale() from None
            raise Conflict() from None

    def _item(self, job: Job) -> dict[str, Any]:
        return {
            **job.model_dump(exclude_none=True),
            "ttl": now_ms() // 1000 + self._job_ttl,
            "pending_shard": pending_shard(job.job_id),
            "pending_since_ms": now_ms(),
            # In the list indexes from the write that creates it (the status index follows each change).
            **list_attributes(self._table, position(job.created_at, job.job_id)),
            STATUS_KEY: status_key(self._table, job.status),
        }

    # ------------------------------------------------------------------ the worker's lease
    def take_lease(self, job_id: str, token: str, now_ms: int, until_ms: int) -> Job:
        try:
            item = self._update(
                job_id,
                {
                    "status": "running",
                    "lease_token": token,
                    "lease_expires_ms": until_ms,
                    "pending_since_ms": now_ms,
                    STATUS_KEY: status_key(self._table, "running"),
                },
                "#status IN (:queued, :running) AND #lease_expires_ms < :now",
                {":queued": "queued", ":running": "running", ":now": now_ms},
                # Counted by the write that takes the lease: a retry of it (a lost reply) finds the
                # lease live and changes nothing.
                extra=(
                    "#attempts = if_not_exists(#attempts, :zero) + :one,"
                    " #started_at = if_not_exists(#started_at, :started)"
                ),
                extra_values={":zero": 0, ":one": 1, ":started": _rfc3339(now_ms)},
                remove=(DEAD_LETTERED,),  # an attempt since: its dead letters, if any, start anew
            )
        except ConditionFailed as failed:
            if failed.item and failed.item.get("lease_token") == token:
                return _stored_job(failed.item)  # this very take, applied before its reply was lost
            raise Conflict(failed.item) from None
        return _stored_job(item)

    def renew_lease(
        self, job_id: str, token: str, until_ms: int, progress: Progress, first_token_at: str | None
    ) -> None:
        changes: dict[str, Any] = {
            "lease_expires_ms": until_ms,
            "progress": progress.model_dump(),
            "pending_since_ms": now_ms(),
        }
        if first_token_at:
            changes["first_token_at"] = first_token_at
        self._owned(job_id, token, changes)

    def hand_over(self, job_id: str, token: str, progress: Progress, input_reported: dict[str, int]) -> None:
        self._owned(
            job_id,
            token,
            {
                "lease_expires_ms": 0,
                "progress": progress.model_dump(),
                "input_reported": input_reported,
                "pending_since_ms": now_ms(),
            },
        )

    def switch_model(self, job_id: str, token: str, segment: Segment, input_reported: dict[str, int]) -> Job:
        try:
            item = self._update(
                job_id,
                {"model_resolved": segment.model, "fallback_used": True, "input_reported": input_reported},
                f"{_HELD} AND #model_resolved <> :model",
                {":me": token, ":model": segment.model, **_RUNNING},
                extra="#segments = list_append(#segments, :segment)",
                extra_values={":segment": [segment.model_dump()]},
            )
        except ConditionFailed as failed:
            current = failed.item or {}
            if current.get("lease_token") == token and current.get("model_resolved") == segment.model:
                return _stored_job(current)  # applied before its reply was lost
            raise Conflict(failed.item) from None
        return _stored_job(item)

    def _owned(self, job_id: str, token: str, changes: dict[str, Any]) -> None:
        """A write only the lease holder may make (idempotent: retrying it changes nothing more)."""
        try:
            self._update(job_id, changes, _HELD, {":me": token, **_RUNNING})
        except ConditionFailed as failed:
            raise Conflict(failed.item) from None

    # ------------------------------------------------------------------ the end
    def end(self, job_id: str, end: JobEnd, guard: EndGuard, settlement: Settlement) -> Job:
        changes: dict[str, Any] = {
            "status": end.status,
            "progress": end.progress.model_dump(),
            "usage": end.usage.model_dump(),
            "cost_nanos": end.cost_nanos,
            "completed_at": end.completed_at,
            "input_reported": end.input_reported,
            "lease_expires_ms": 0,
            "ended_by": guard.token,
            STATUS_KEY: status_key(self._table, end.status),
        }
        for name in ("output", "error", "first_token_at", "finish_reason"):
            if getattr(end, name) is not None:
                changes[name] = getattr(end, name)
        if end.segments is not None:
            changes["segments"] = [s.model_dump() for s in end.segments]
        values: dict[str, Any]
        if guard.kind == "lease":
            condition, values = _HELD, {":me": guard.token, **_RUNNING}
        elif guard.kind == "queued":
            condition, values = "#status = :queued", {":queued": "queued"}
        else:
            condition = "#status IN (:queued, :running) AND #lease_expires_ms < :now"
            values = {":queued": "queued", ":now": guard.now_ms, **_RUNNING}
        subscribed = end.subscribed
        settled = settlement_writes(self._usage, settlement, now_ms())
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            # The end mark goes in the same transaction, live (for the fanout) when the job has a
            # WebSocket subscriber; a writer that saw none writes on condition that there still is none
            # (a subscribe may come at any time).
            guarded, checked = condition, values
            if not subscribed:
                guarded = (
                    f"({condition}) AND (attribute_not_exists(#subscribed) OR #subscribed = :unsubscribed)"
                )
                checked = {**values, ":unsubscribed": False}
            request = self._update_request(
                job_id, changes, guarded, checked, remove=("pending_shard", "pending_since_ms")
            )
            writes = [request, *settled, self._end_mark(job_id, end, live=subscribed)]
            try:
                transact(self._table.client, writes)
                break
            except ConditionFailed as failed:
                code, current = failed.reasons[0] if failed.reasons else ("None", None)
                if code == "ConditionalCheckFailed":
                    if current and current.get("ended_by") == guard.token:
                        return _stored_job(current)  # this very end, applied before its reply was lost
                    if current and current.get("subscribed") and not subscribed:
                        subscribed = True  # a client subscribed since: the end mark goes live
                        continue
                    raise Conflict(current) from None
                if stale_settlement(failed, 1, len(settled)):
                    raise SettlementStale() from None
                if attempt == TRANSACTION_ATTEMPTS:  # another transaction kept a usage item busy
                    raise
                time.sleep(0.01 * attempt)
        job = self.get(job_id)
        assert job is not None
        return job

    def _end_mark(self, job_id: str, end: JobEnd, *, live: bool) -> dict[str, Any]:
        """The end mark's put (see ``EndMark``); ``live`` for a subscribed job, so the chunk stream's
        filter passes it to the fanout."""
        if self._chunks is None:
            raise RuntimeError("this job store was built without the chunk table")
        mark = EndMark(
            job_id=job_id,
            status=end.status,
            usage=end.usage,
            cost_nanos=end.cost_nanos,
            error=end.error,
            last_sequence_id=end.progress.last_sequence_id,
        )
        item = {
            **mark.model_dump(exclude_none=True),
            "sequence_id": END_SEQUENCE_ID,
            **({"live": True} if live else {}),
            "ttl": now_ms() // 1000 + self._job_ttl,
        }
        return self._chunks.put_request(JOB_KIND, job_id, item)

    def request_cancel(self, job_id: str) -> Job:
        try:
            item = self._update(job_id, {"cancel_requested": True}, "#status = :running", _RUNNING)
        except ConditionFailed as failed:
            raise Conflict(failed.item) from None
        return _stored_job(item)

    def signals(self, job_id: str) -> Signals:
        item = self._table.get(
            JOB_KIND, job_id, attributes=["cancel_requested", "subscribed"], consistent=False
        )
        item = item or {}
        return Signals(cancel=bool(item.get("cancel_requested")), subscribed=bool(item.get("subscribed")))

    def mark_subscribed(self, job_id: str) -> Job:
        try:
            item = self._update(
                job_id,
                {"subscribed": True},
                "attribute_exists(#pk) AND NOT #status IN (:completed, :failed, :cancelled)",
                {":completed": "completed", ":failed": "failed", ":cancelled": "cancelled"},
            )
        except ConditionFailed as failed:
            if failed.item is None:
                raise Conflict(None) from None
            return _stored_job(failed.item)  # ended: nothing to mark
        return _stored_job(item)

    def status(self, job_id: str) -> Status | None:
        item = self._table.get(JOB_KIND, job_id, attributes=["status"], consistent=False)
        return item["status"] if item else None

    def requeue(self, job_id: str, seen_pending_ms: int, now_ms: int) -> bool:
        try:
            self._update(
                job_id,
                {"pending_since_ms": now_ms},
                "#pending_since_ms = :seen AND #status IN (:queued, :running)",
                {":seen": seen_pending_ms, ":queued": "queued", **_RUNNING},
            )
        except ConditionFailed as failed:
            return bool(failed.item and failed.item.get("pending_since_ms") == now_ms)  # our own touch
        return True

    def dead_lettered_since(self, job_id: str, now_ms: int) -> int:
        try:
            item = self._update(
                job_id,
                {"pending_since_ms": now_ms},
                "#status IN (:queued, :running) AND #lease_expires_ms < :now",
                {":queued": "queued", ":now": now_ms, **_RUNNING},
                extra=f"#{DEAD_LETTERED} = if_not_exists(#{DEAD_LETTERED}, :now)",
            )
        except ConditionFailed as failed:
            raise Conflict(failed.item) from None
        return int(item[DEAD_LETTERED])

    # ------------------------------------------------------------------ update helpers
    def _update_request(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        condition: str,
        values: Mapping[str, Any],
        *,
        extra: str | None = None,
        extra_values: Mapping[str, Any] | None = None,
        remove: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """``SET`` each change (plus ``extra``), ``REMOVE`` the ``remove`` attributes, if ``condition``."""
        assignments = [f"#{name} = :set_{name}" for name in changes]
        if extra:
            assignments.append(extra)
        expression = "SET " + ", ".join(assignments)
        if remove:
            expression += " REMOVE " + ", ".join(f"#{name}" for name in remove)
        used = {*changes, *remove, *_names_in(condition), *_names_in(extra or "")}
        return self._table.update_request(
            JOB_KIND,
            job_id,
            expression,
            condition=condition,
            names={f"#{name}": name for name in used},
            values={**{f":set_{k}": v for k, v in changes.items()}, **values, **(extra_values or {})},
        )

    def _update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        condition: str,
        values: Mapping[str, Any],
        *,
        extra: str | None = None,
        extra_values: Mapping[str, Any] | None = None,
        remove: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The same as one UpdateItem; ``ConditionFailed`` carries the current item."""
        request = self._update_request(
            job_id, changes, condition, values, extra=extra, extra_values=extra_values, remove=remove
        )
        update = request["Update"]
        return self._table.update(
            JOB_KIND,
            job_id,
            update["UpdateExpression"],
            condition=condition,
            names=update["ExpressionAttributeNames"],
            values={**{f":set_{k}": v for k, v in changes.items()}, **values, **(extra_values or {})},
        )


def _names_in(expression: str) -> set[str]:
    return set(re.findall(r"#(\w+)", expression))


def _claim(key_hash: str, item: Mapping[str, Any]) -> Claim:
    return Claim(
        key_hash=key_hash,
        job_id=str(item["job_id"]),
        fingerprint=str(item["fingerprint"]),
        created_at=str(item.get("created_at", "")),
        expires_at_s=int(item.get("ttl", 0)),
    )


def _rfc3339(moment_ms: int) -> str:
    from spool_core.clock import from_epoch, rfc3339

    return rfc3339(from_epoch(moment_ms / 1000))


class DynamoChunkLog:
    def __init__(self, table: ScopedTable, ttl_seconds: int) -> None:
        self._table = table
        self._ttl = ttl_seconds

    def append(self, job_id: str, chunk: Chunk) -> None:
        try:
            self._table.put(
                JOB_KIND,
                job_id,
                {**chunk.model_dump(exclude_none=True), "ttl": now_ms() // 1000 + self._ttl},
                condition="attribute_not_exists(pk)",
            )
        except ConditionFailed as failed:
            current = failed.item or {}
            if current.get("writer") == chunk.writer and current.get("text") == chunk.text:
                return  # this very chunk, written before its reply was lost
            raise Conflict(failed.item) from None

    # Every read stops at MAX_SEQUENCE_ID: the job's end mark (END_SEQUENCE_ID) is not a chunk.
    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        if after >= MAX_SEQUENCE_ID:
            return []  # nothing can follow; DynamoDB refuses a BETWEEN whose bounds are reversed
        items = self._table.query(
            JOB_KIND,
            job_id,
            sort_condition="sequence_id BETWEEN :first AND :max",
            values={":first": after + 1, ":max": MAX_SEQUENCE_ID},
            limit=limit,
            consistent=consistent,
        )
        return [Chunk.model_validate(item) for item in items]

    def page(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> LogPage:
        items = self._table.query(
            JOB_KIND,
            job_id,
            sort_condition="sequence_id > :after",
            values={":after": after},
            limit=limit + 1,  # the end mark, if no more than ``limit`` chunks remain
            consistent=consistent,
        )
        chunks: list[Chunk] = []
        for item in items:
            if int(item["sequence_id"]) == END_SEQUENCE_ID:
                return LogPage(chunks, EndMark.model_validate(item))
            if len(chunks) < limit:
                chunks.append(Chunk.model_validate(item))
        return LogPage(chunks)

    def last(self, job_id: str) -> Chunk | None:
        items = list(
            self._table.query(
                JOB_KIND,
                job_id,
                sort_condition="sequence_id <= :max",
                values={":max": MAX_SEQUENCE_ID},
                limit=1,
                forward=False,
            )
        )
        return Chunk.model_validate(items[0]) if items else None

    def all(self, job_id: str) -> Iterator[Chunk]:
        items = self._table.query(
            JOB_KIND, job_id, sort_condition="sequence_id <= :max", values={":max": MAX_SEQUENCE_ID}
        )
        return (Chunk.model_validate(item) for item in items)

    def redeliver_end(self, job_id: str) -> bool:
        """The end mark touched and made live (a MODIFY record the fanout's filter passes): the chunk
        stream delivers the job's end again. Only an existing mark: a job that has not ended has none."""
        try:
            self._table.update(
                JOB_KIND,
                job_id,
                "SET live = :yes ADD redeliveries :one",
                sort={"sequence_id": END_SEQUENCE_ID},
                condition="attribute_exists(pk)",
                values={":yes": True, ":one": 1},
            )
        except ConditionFailed:
            return False
        return True


RETRY_KIND = "retry"


class DynamoRetryKeys:
    """The keys given to a tenant's OpenAI requests sent without one, by request digest, on the jobs
    table (``spool_core.openai_compat.retries``); expired by DynamoDB's TTL, and on read until then."""

    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    def remember(self, digest: str, key: str, now_s: int, expires_at_s: int) -> None:
        try:
            self._table.put(
                RETRY_KIND,
                digest,
                {"key": key, "ttl": expires_at_s},
                condition="attribute_not_exists(pk) OR #ttl <= :now",
                names={"#ttl": "ttl"},
                values={":now": now_s},
            )
        except ConditionFailed:  # another request with these bytes is remembered: neither is folded
            self._table.update(
                RETRY_KIND,
                digest,
                "SET ambiguous = :yes, #ttl = :ttl",
                names={"#ttl": "ttl"},
                values={":yes": True, ":ttl": expires_at_s},
            )

    def recall(self, digest: str, now_s: int) -> str | None:
        item = self._table.get(RETRY_KIND, digest)
        if item is None or int(item.get("ttl", 0)) <= now_s or item.get("ambiguous"):
            return None
        return str(item["key"])


class SqsJobQueue:
    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

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
        body = message.model_dump_json(exclude_none=True)  # optional fields only when set (JobMessage)
        if delay_seconds > 0:
            self._client.send_message(QueueUrl=self._queue_url, MessageBody=body, DelaySeconds=delay_seconds)
        else:
            self._client.send_message(QueueUrl=self._queue_url, MessageBody=body)

    def waiting(self) -> int:
        answer = self._client.get_queue_attributes(
            QueueUrl=self._queue_url,
            AttributeNames=["ApproximateNumberOfMessages"],
        )
        return int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", "0"))


class DynamoPendingJobs:
    """The pending-jobs index of the jobs table (a sparse index: only jobs not yet ended are in it).
    A system reader, like the stream consumers: it reads every tenant's jobs, by key only."""

    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def older_than(self, before_ms: int, limit: int) -> list[PendingJob]:
        found: list[PendingJob] = []
        for item in PENDING.before(self._client, self._table, before_ms, limit):
            tenant, kind, job_id = TenantScope.parts_of_key(str(item["pk"]))
            if kind == JOB_KIND:
                found.append(PendingJob(tenant, job_id, int(item["pending_since_ms"])))
        return found[:limit]
