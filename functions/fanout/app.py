"""Fanout: the chunk table's and the jobs table's DynamoDB streams push new chunks, then ``done``,
to each job's WebSocket subscribers.

Before pushing to a connection it checks that the API key the connection opened with is still
active (through the same per-environment key cache as the authorizer, ``SPOOL_AUTH_CACHE_SECONDS``);
a connection whose key was revoked gets a final ``unauthorized`` error frame and is closed.
"""

from __future__ import annotations

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from spool_core import bootstrap
from spool_core.jobs.model import TERMINAL
from spool_core.observability import logger, tracer
from spool_core.tenancy import SEPARATOR, Tenant

processor = BatchProcessor(event_type=EventType.DynamoDBStreams, raise_on_entire_batch_failure=False)
_delivered: set[tuple[str, str]] = set()  # jobs already caught up in this batch


def record_handler(record: DynamoDBRecord) -> None:
    if record.dynamodb is None or not record.dynamodb.keys:
        return
    tenant_id, kind, job_id = str(record.dynamodb.keys["pk"]).split(SEPARATOR, 2)
    if kind != "job":
        return
    image = record.dynamodb.new_image or {}
    if "sequence_id" not in record.dynamodb.keys and image.get("status") not in TERMINAL:
        return  # a job item change other than its end: nothing to push
    if (tenant_id, job_id) in _delivered:
        return  # a delivery reads everything after each cursor: once per job per batch is enough
    config = bootstrap.settings()
    bootstrap.fanout(Tenant(tenant_id), config).deliver(job_id, access=bootstrap.connection_guard(config))
    _delivered.add((tenant_id, job_id))


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, object], context: LambdaContext) -> PartialItemFailureResponse:
    _delivered.clear()
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
