"""Fanout: the chunk table's DynamoDB stream pushes new chunks, then ``done``, to each job's WebSocket
subscribers.

The stream's filter passes only chunks written while the job had a subscriber (``live``) and the end
mark a subscribed job's end writes behind its last chunk. The records carry what is pushed
(``NEW_IMAGE``: a chunk's sequence id and text; the end mark's status, usage, cost and error), so a
batch is grouped by job and each job costs one Query of its subscriptions; each message sent is one
conditional write (``spool_core.subscriptions``).

Before pushing to a connection it checks that the API key the connection opened with is still
active (through the same per-environment key cache as the authorizer, ``SPOOL_AUTH_CACHE_SECONDS``);
a connection whose key was revoked gets a final ``unauthorized`` error frame and is closed.
"""

from __future__ import annotations

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from spool_core import bootstrap, snapshot
from spool_core.adapters import api_keys  # noqa: F401 - the key lookup at init: every delivery checks keys
from spool_core.fanout_batch import FanoutBatch, Group
from spool_core.observability import logger, tracer
from spool_core.tenancy import Tenant

# What a first delivery loads (the subscriptions, the pusher, the job service and its stores): before a
# snapshot, not on each new container's first batch (see spool_core.snapshot).
snapshot.load_before_snapshot(
    "spool_core.subscriptions",
    "spool_core.adapters.websocket",
    "spool_core.jobs.service",
    "spool_core.adapters.jobs",
    "spool_core.adapters.usage",
    "spool_core.events",
)
processor = BatchProcessor(event_type=EventType.DynamoDBStreams, raise_on_entire_batch_failure=False)
_batch = FanoutBatch([])
_request_id: str | None = None  # the invocation's: named in the error frame a revoked key's connection gets


def _deliver(tenant_id: str, job_id: str, group: Group) -> None:
    config = bootstrap.settings()
    bootstrap.fanout(Tenant(tenant_id), config).deliver(
        job_id,
        chunks=group.chunks,
        ended=group.ended,
        until=group.until,
        end_unread=group.end_unread,
        access=bootstrap.connection_guard(config),
        request_id=_request_id,
    )


def record_handler(record: DynamoDBRecord) -> None:
    """Each record reports its job's delivery (made for the whole batch by ``deliver_all``): a failed
    delivery fails each of the job's records (Lambda retries from the first)."""
    _batch.handle(record.raw_event, _deliver)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, object], context: LambdaContext) -> PartialItemFailureResponse:
    global _batch, _request_id
    _request_id = context.aws_request_id
    records = event.get("Records")
    _batch = FanoutBatch(records if isinstance(records, list) else [])
    _batch.deliver_all(_deliver)  # every job of the batch at once; each record then reports its job's
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
