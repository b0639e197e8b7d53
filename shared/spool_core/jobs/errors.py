"""The jobs' domain errors (statuses come from the one mapping in spool_core.api)."""

from __future__ import annotations

from typing import ClassVar

from spool_core.errors import Conflict, InvalidRequest, NotFound, Unprocessable


class JobNotFound(NotFound):
    code = "job_not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = ("Check the job_id; create a job with POST /v1/jobs",)


class IdempotencyKeyRequired(InvalidRequest):
    code = "idempotency_key_required"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Send an 'Idempotency-Key' header (1-255 characters), e.g. a UUID generated once per logical request",
        "Reuse the same key when you retry the same request",
    )


class RequestInProgress(Conflict):
    code = "request_in_progress"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Poll GET /v1/jobs/{job_id} or read its chunks; the job started by the first request is running",
    )


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Use a new Idempotency-Key for a different request",
        "Retry with exactly the same body to get the original job",
    )


class ContextTooLarge(InvalidRequest):
    code = "context_too_large"
