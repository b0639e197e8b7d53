"""The message the jobs API puts on the queue, and the entry point of its consumers.

Import order matters for a consumer's cold start: Powertools' batch utilities import every event
model of Powertools' parser (over a hundred pydantic models, ~130 M instructions, 25 ms) if pydantic
is already loaded when they are first imported, only for their type hints; we never pass a model.
A consumer therefore imports ``aws_lambda_powertools.utilities.batch`` before anything that loads
pydantic (``spool_core.bootstrap`` does): see worker/app.py (tests/unit/test_cold_imports.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from spool_core.observability import logger, metrics, tracer


class JobMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(min_length=1, max_length=64)
    tenant_id: str = Field(min_length=1, max_length=64)
    continuation: int = Field(default=0, ge=0)  # how many invocations this job has already yielded
    # The invocation that sent it handed over after its provider stalled with nothing written, the
    # job's log then this many tokens long: if this one does the same from there, the job fails (a
    # redelivery after a later invocation wrote more does not). Sent only then: older workers refuse
    # fields they do not know, and read every other message as before.
    stalled_at: int | None = Field(default=None, ge=0)
    # Since when (epoch ms) the job has waited for open circuits, every model of its chain skipped by
    # each invocation since then: the wait ends in failure once it is longer than the runner's bound.
    # Sent only then, as ``stalled_at`` is.
    circuit_wait_since_ms: int | None = Field(default=None, ge=0)


class MessageNotDone(Exception):
    """Raised by a record handler to leave its message on the queue (reported as a batch item failure)."""


def sqs_batch_handler(
    record_handler: Callable[..., None],
) -> Callable[[dict[str, Any], LambdaContext], PartialItemFailureResponse]:
    """The Lambda entry point for an SQS consumer: logging, tracing, metrics, and partial batch
    failures. A record left for retry (``MessageNotDone`` or any error) is a normal outcome reported
    in ``batchItemFailures``, not an invocation error, even when it is the whole batch."""
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

    wants_context = "lambda_context" in inspect.signature(record_handler).parameters

    def logged(record: Any, lambda_context: LambdaContext) -> None:
        """BatchProcessor reports a failed record to SQS but logs nothing: say why, once per record."""
        try:
            if wants_context:
                record_handler(record, lambda_context)
            else:
                record_handler(record)
        except MessageNotDone:
            raise
        except Exception:
            logger.exception(
                "record failed; it returns to the queue", extra={"message_id": record.message_id}
            )
            raise

    @logger.inject_lambda_context(clear_state=True)
    @tracer.capture_lambda_handler
    @metrics.log_metrics
    def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
        return process_partial_response(
            event=event, record_handler=logged, processor=processor, context=context
        )

    return handler
