"""Domain errors. Each carries a stable ``code``, a human message, the numbers a client needs to act
(``details``) and concrete fixes (``suggestions``). They know nothing of HTTP: ``spool_core.api.errors``
is the one place that maps them to status codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class SpoolError(Exception):
    code: ClassVar[str] = "internal_error"
    default_suggestions: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        suggestions: Sequence[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.suggestions: list[str] = list(
            suggestions if suggestions is not None else self.default_suggestions
        )
        self.headers: dict[str, str] = {}  # HTTP headers the answer should carry (Retry-After, ...)


class InternalError(SpoolError):
    code = "internal_error"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Retry the request; if it keeps failing, report the request_id to the operator",
    )


class ConfigurationError(InternalError):
    """The deployment is missing a setting; only operators can fix it."""


class InvalidRequest(SpoolError):
    code = "invalid_request"
    default_suggestions: ClassVar[tuple[str, ...]] = ("Check the request body against the API contract",)


class Unauthorized(SpoolError):
    code = "unauthorized"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Send your API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        "Create a key with 'spool keys create --tenant <tenant>'",
    )


class NotFound(SpoolError):
    code = "not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Check the path; the API lives under /v1 (see GET /v1/health)",
    )


class MethodNotAllowed(SpoolError):
    code = "method_not_allowed"


class DependencyUnavailable(SpoolError):
    """A backing service (DynamoDB, S3, SQS, a model provider) did not answer."""

    code = "service_unavailable"
    default_suggestions: ClassVar[tuple[str, ...]] = ("Retry after a short wait; check GET /v1/health",)


class Conflict(SpoolError):
    code = "conflict"
    default_suggestions: ClassVar[tuple[str, ...]] = ("Read the resource again and retry the change",)


class Unprocessable(SpoolError):
    code = "unprocessable"


class Gone(SpoolError):
    code = "gone"


class PayloadTooLarge(SpoolError):
    code = "payload_too_large"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Upload large contexts with POST /v1/contexts/uploads and a presigned PUT",
        "Send only what changed with PATCH /v1/contexts/{id}",
    )


class ModelNotFound(InvalidRequest):
    code = "model_not_found"


class UnknownModel(NotFound):
    """A model asked for by its path (``GET /v1/models/{id}``): 404, as OpenAI answers it."""

    code = "model_not_found"
