"""A fanout invocation's chunk-stream records, grouped by job.

The chunk table's stream record of a new live chunk carries the chunk (``NEW_IMAGE``: sequence id and
text); the record of a job's end mark carries how the job ended. The fanout pushes from them and reads
the chunk log only to fill a gap. Records are grouped by job so that a batch costs one delivery (one
Query of the job's subscriptions) per job, whatever the number of its records.

The jobs of a batch are delivered at the same time (``deliver_all``): a batch holds the records of
every job whose chunks its shard got meanwhile (the stream is read one batch of a shard at a time, so
that a job's records come in order), and each delivery is a few DynamoDB calls and pushes in a row,
waiting on the network; one after another, the last job of a batch waited for all the others'.
A job's own records stay in one delivery, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from spool_core.adapters.dynamodb import deserialize
from spool_core.jobs.model import END_SEQUENCE_ID, Chunk, EndMark
from spool_core.observability import logger
from spool_core.tenancy import SEPARATOR

JobKey = tuple[str, str]  # (tenant id, job id)
# Jobs of one batch delivered at once (each holds a DynamoDB connection of the client's pool of 32).
DELIVERIES_AT_ONCE = 16


class DeliveryFailed(RuntimeError):
    """Another record of the same job failed to deliver in this batch: this one is retried with it."""


def job_key(record: Mapping[str, Any]) -> JobKey | None:
    """The (tenant, job) of a chunk-table record, or None for another kind of item."""
    keys = (record.get("dynamodb") or {}).get("Keys") or {}
    parts = str((keys.get("pk") or {}).get("S", "")).split(SEPARATOR, 2)
    if len(parts) != 3 or parts[1] != "job" or "sequence_id" not in keys:
        return None
    return parts[0], parts[2]


@dataclass
class Group:
    """One job's records in a batch: its new chunks, in order, and its end if the batch has it.
    ``until``: the highest sequence id its records named (those that could not be read as a chunk are
    delivered from the log up to there); ``end_unread``: the end mark's record could not be read (the
    delivery reads how the job ended from the job)."""

    chunks: list[Chunk] = field(default_factory=list)
    ended: EndMark | None = None
    until: int = 0
    end_unread: bool = False
    delivered: bool = False
    error: BaseException | None = None


Deliver = Callable[[str, str, Group], None]


class FanoutBatch:
    def __init__(self, records: Sequence[Any]) -> None:
        self._groups: dict[JobKey, Group] = {}
        for record in records:
            if isinstance(record, Mapping):
                self._add(record)

    @property
    def groups(self) -> dict[JobKey, Group]:
        return self._groups

    def _add(self, record: Mapping[str, Any]) -> None:
        key = job_key(record)
        data = record.get("dynamodb") or {}
        image = data.get("NewImage")
        if key is None or not image:
            return  # not a chunk or an end mark, or a removal (a TTL expiry): nothing to push
        sequence = int((data.get("Keys") or {})["sequence_id"].get("N", 0))
        group = self._groups.setdefault(key, Group())
        try:
            item = deserialize(image)
            if sequence == END_SEQUENCE_ID:
                group.ended = EndMark.model_validate(item)
            else:
                group.chunks.append(Chunk.model_validate(item))
                group.until = max(group.until, sequence)
        except (ValidationError, ValueError, TypeError):  # delivered from the log and the job instead
            logger.warning(
                "a stream record the fanout cannot read; delivering from the log", extra={"job": key}
            )
            if sequence == END_SEQUENCE_ID:
                group.end_unread = True
            else:
                group.until = max(group.until, sequence)

    def deliver_all(self, deliver: Deliver, *, at_once: int = DELIVERIES_AT_ONCE) -> None:
        """Deliver every job of the batch, up to ``at_once`` at a time; a delivery that fails is kept
        for ``handle`` to fail each of that job's records."""
        pending = [(key, group) for key, group in self._groups.items() if not group.delivered]
        if len(pending) <= 1 or at_once <= 1:
            for key, group in pending:
                self._deliver(key, group, deliver)
            return
        with ThreadPoolExecutor(max_workers=min(at_once, len(pending)), thread_name_prefix="fanout") as pool:
            futures = [pool.submit(self._deliver, key, group, deliver) for key, group in pending]
        for future in futures:
            future.result()  # what is not an Exception (the process dying, say) ends the invocation

    @staticmethod
    def _deliver(key: JobKey, group: Group, deliver: Deliver) -> None:
        group.delivered = True
        try:
            deliver(key[0], key[1], group)
        except Exception as exc:  # reported by handle(), record by record
            group.error = exc

    def handle(self, record: Mapping[str, Any], deliver: Deliver) -> None:
        """Report the record's job's delivery, delivering it first if ``deliver_all`` has not (once per
        batch): a failed delivery fails each of the job's records."""
        key = job_key(record)
        group = self._groups.get(key) if key else None
        if key is None or group is None:
            return
        if not group.delivered:
            self._deliver(key, group, deliver)
        if group.error is not None:
            raise DeliveryFailed(f"delivery of job {key[1]} failed") from group.error
