"""SQS worker: one record per generation job, partial batch failures reported to SQS."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.jobs.runner import Outcome
from spool_core.observability import logger, metrics, tracer
from spool_core.queue import JobMessage, MessageNotDone
from spool_core.tenancy import Tenant

# A record left for retry is a normal outcome (reported in batchItemFailures), not an invocation error.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@tracer.capture_method
def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    message = JobMessage.model_validate_json(record.body)
    settings = bootstrap.settings()
    sqs = aws.sqs(settings)

    def extend_visibility(seconds: int) -> None:
        try:
            sqs.change_message_visibility(
                QueueUrl=settings.jobs_queue_url,
                ReceiptHandle=record.receipt_handle,
                VisibilityTimeout=seconds,
            )
        except ClientError as exc:  # the lease still guards the job; a redelivery finds it leased
            logger.warning("could not extend the message's visibility", extra={"error": str(exc)})

    logger.append_keys(job_id=message.job_id, tenant_id=message.tenant_id)
    runner = bootstrap.job_runner(Tenant(message.tenant_id), settings)
    outcome = runner.run(
        message.job_id, heartbeat=extend_visibility, remaining_ms=lambda_context.get_remaining_time_in_millis
    )
    if outcome is Outcome.YIELD:
        extend_visibility(0)  # continue in a fresh invocation right away
    if outcome is not Outcome.DONE:
        raise MessageNotDone(f"job {message.job_id}: {outcome.value}")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
