"""Dead-letter consumer: a job whose message kept failing ends ``failed`` with a structured error.
Every input ends: an unreadable message or one naming an invalid tenant is dropped with its reason
logged (it can never succeed, and retrying it for the queue's 14 days helps nobody)."""

from __future__ import annotations

# Powertools' batch utilities, before pydantic: see spool_core/queue.py
import aws_lambda_powertools.utilities.batch  # noqa: F401
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from spool_core import bootstrap
from spool_core.jobs.outcome import Outcome
from spool_core.observability import logger, tracer
from spool_core.queue import JobMessage, MessageNotDone, sqs_batch_handler
from spool_core.tenancy import InvalidTenantId, Tenant


@tracer.capture_method
def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    try:
        message = JobMessage.model_validate_json(record.body)
        tenant = Tenant(message.tenant_id)
    except (ValidationError, InvalidTenantId) as exc:
        logger.error(
            "unusable dead letter dropped",
            extra={"message_id": record.message_id, "reason": str(exc)[:500], "body": record.body[:500]},
        )
        return
    outcome = bootstrap.dead_letters(tenant).handle(message.job_id, request_id=lambda_context.aws_request_id)
    if outcome is not Outcome.DONE:
        raise MessageNotDone(f"job {message.job_id} is still leased; looking again later")


lambda_handler = sqs_batch_handler(record_handler)
