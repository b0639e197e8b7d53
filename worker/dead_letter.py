"""Dead-letter consumer: a job whose message kept failing ends ``failed`` with a structured error."""

from __future__ import annotations

from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from pydantic import ValidationError

from spool_core import bootstrap
from spool_core.jobs.runner import Outcome
from spool_core.observability import logger, tracer
from spool_core.queue import JobMessage, MessageNotDone, sqs_batch_handler
from spool_core.tenancy import Tenant


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


lambda_handler = sqs_batch_handler(record_handler)
