"""Dead-letter consumer: a job whose message kept failing ends ``failed`` with a structured error."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from spool_core import bootstrap
from spool_core.jobs.runner import Outcome
from spool_core.observability import logger, metrics, tracer
from spool_core.queue import JobMessage, MessageNotDone
from spool_core.tenancy import Tenant

# A record left for retry is a normal outcome (reported in batchItemFailures), not an invocation error.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@tracer.capture_method
def record_handler(record: SQSRecord) -> None:
    try:
        message = JobMessage.model_validate_json(record.body)
    except ValidationError:
        logger.error(
            "unreadable dead letter dropped",
            extra={"message_id": record.message_id, "body": record.body[:500]},
        )
        return
    outcome = bootstrap.job_runner(Tenant(message.tenant_id)).dead_lettered(message.job_id)
    if outcome is not Outcome.DONE:
        raise MessageNotDone(f"job {message.job_id} is still leased; looking again later")
    logger.warning("dead-lettered job marked failed", extra={"job_id": message.job_id})


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
