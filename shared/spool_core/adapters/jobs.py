"""The jobs' DynamoDB and SQS adapters, each bound to one tenant's scope."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable, transact
from spool_core.jobs.model import Chunk, Job
from spool_core.jobs.ports import Conflict
from spool_core.queue import JobMessage

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

JOB_KIND = "job"
IDEMPOTENCY_KIND = "idem"
_NAME = re.compile(r"#(\w+)")


class DynamoJobStore:
    def __init__(self, table: ScopedTable, job_ttl_seconds: int) -> None:
        self._table = table
        self._job_ttl = job_ttl_seconds

    def get(self, job_id: str) -> Job | None:
        item = self._table.get(JOB_KIND, job_id)
        return Job.model_validate(item) if item else None

    def claim(self, idempotency_key: str, job_id: str, fingerprint: str, created_at: str, ttl: int) -> None:
        record = {"job_id": job_id, "fingerprint": fingerprint, "created_at": created_at, "ttl": ttl}
        try:
            self._table.put(IDEMPOTENCY_KIND, idempotency_key, record, condition="attribute_not_exists(pk)")
        except ConditionFailed as exc:
            raise Conflict(exc.item) from None

    def create(self, job: Job) -> None:
        item = {**job.model_dump(), "ttl": int(time.time()) + self._job_ttl}
        self._table.put(JOB_KIND, job.job_id, item, condition="attribute_not_exists(pk)")

    def idempotency_record(self, idempotency_key: str) -> Mapping[str, Any] | None:
        return self._table.get(IDEMPOTENCY_KIND, idempotency_key)

    def discard(self, job_id: str, idempotency_key: str) -> None:
        self._table.delete_all([(IDEMPOTENCY_KIND, idempotency_key), (JOB_KIND, job_id)])

    def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        condition: str | None = None,
        values: Mapping[str, Any] | None = None,
        also: Sequence[Mapping[str, Any]] = (),
    ) -> Job:
        expression = "SET " + ", ".join(f"#{name} = :set_{name}" for name in changes)
        used = set(changes) | set(_NAME.findall(condition or ""))
        names = {f"#{name}": name for name in used}
        all_values = {**{f":set_{name}": value for name, value in changes.items()}, **(values or {})}
        try:
            if not also:
                item = self._table.update(
                    JOB_KIND, job_id, expression, condition=condition, names=names, values=all_values
                )
                return Job.model_validate(item)
            request = self._table.update_request(
                JOB_KIND, job_id, expression, condition=condition, names=names, values=all_values
            )
            transact(self._table.client, [request, *also])
        except ConditionFailed as exc:
            raise Conflict(exc.item) from None
        job = self.get(job_id)
        assert job is not None
        return job

    def cancel_requested(self, job_id: str) -> bool:
        item = self._table.get(JOB_KIND, job_id, attributes=["cancel_requested"])
        return bool(item and item.get("cancel_requested"))


class DynamoChunkLog:
    def __init__(self, table: ScopedTable, ttl_seconds: int, clock: Any) -> None:
        self._table = table
        self._ttl = ttl_seconds
        self._clock = clock

    def append(self, job_id: str, chunk: Chunk) -> None:
        try:
            self._table.put(
                JOB_KIND,
                job_id,
                {**chunk.model_dump(), "ttl": int(self._clock() + self._ttl)},
                condition="attribute_not_exists(pk)",
            )
        except ConditionFailed:
            raise Conflict() from None

    def after(self, job_id: str, after: int, limit: int) -> list[Chunk]:
        items = self._table.query(
            JOB_KIND, job_id, sort_condition="sequence_id > :after", values={":after": after}, limit=limit
        )
        return [Chunk.model_validate(item) for item in items]

    def last(self, job_id: str) -> Chunk | None:
        items = list(self._table.query(JOB_KIND, job_id, limit=1, forward=False))
        return Chunk.model_validate(items[0]) if items else None

    def all(self, job_id: str) -> Iterator[Chunk]:
        return (Chunk.model_validate(item) for item in self._table.query(JOB_KIND, job_id))


class SqsJobQueue:
    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def send(self, job_id: str, tenant_id: str) -> None:
        body = JobMessage(job_id=job_id, tenant_id=tenant_id).model_dump_json()
        self._client.send_message(QueueUrl=self._queue_url, MessageBody=body)
