"""SQS worker: one record per generation job, partial batch failures reported to SQS."""

from __future__ import annotations

import threading

# Powertools' batch utilities, before pydantic: see spool_core/queue.py
import aws_lambda_powertools.utilities.batch  # noqa: F401
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from spool_core import bootstrap, snapshot
from spool_core.adapters import aws
from spool_core.jobs.runner import Outcome  # the runner at init: every invocation runs a job
from spool_core.observability import logger, tracer
from spool_core.queue import JobMessage, MessageNotDone, sqs_batch_handler
from spool_core.tenancy import Tenant

# What a first job loads, before a snapshot rather than in each new container (spool_core.snapshot).
snapshot.load_before_snapshot(
    "spool_core.jobs.service",
    "spool_core.adapters.jobs",
    "spool_core.adapters.contexts",
    "spool_core.adapters.usage",
    "spool_core.adapters.circuits",
    "spool_core.flags",
    "spool_core.providers.simulated",
    "spool_core.providers.openai_compatible",
    "spool_core.providers.bedrock",
)
snapshot.register_before_snapshot(snapshot.create_openai_client)


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
    # The message stays hidden at least as long as the lease the runner is about to take, so that
    # after a crash it comes back once that lease has expired and the next attempt takes over at once
    # (the runner extends it again with each renewal). Asked for while the runner takes the lease, not
    # before: nothing waits for it but the end of this record. Asked for once the runner is built
    # (reading the model registry can take seconds on a cold container), so it lands within the
    # extra second of the lease's start.
    runner = bootstrap.job_runner(Tenant(message.tenant_id), settings)
    hidden = threading.Thread(
        target=extend_visibility, args=(runner.settings.visibility_seconds,), daemon=True
    )
    hidden.start()
    try:
        outcome = runner.run(
            message.job_id,
            heartbeat=extend_visibility,
            remaining_ms=lambda_context.get_remaining_time_in_millis,
            continuation=message.continuation,
            stalled_at=message.stalled_at,
            circuit_wait_since_ms=message.circuit_wait_since_ms,
            request_id=lambda_context.aws_request_id,
        )
    finally:
        hidden.join()
    # YIELD: a continuation message carries the job on; this one is done (a yield is not a failure,
    # so it never spends the message's delivery budget).
    if outcome is Outcome.RETRY:
        raise MessageNotDone(f"job {message.job_id}: {outcome.value}")


lambda_handler = sqs_batch_handler(record_handler)
