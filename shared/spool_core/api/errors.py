"""The one place that maps domain errors to HTTP: status codes and the error envelope."""

from __future__ import annotations

from typing import Any

from spool_core.errors import (
    Conflict,
    DependencyUnavailable,
    Gone,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SpoolError,
    Unauthorized,
    Unprocessable,
)
from spool_core.limits.errors import RateLimited

STATUS_BY_ERROR: dict[type[SpoolError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    MethodNotAllowed: 405,
    Conflict: 409,
    Gone: 410,
    PayloadTooLarge: 413,
    Unprocessable: 422,
    RateLimited: 429,
    InternalError: 500,
    DependencyUnavailable: 503,
}


def register_status(error: type[SpoolError], status: int) -> None:
    """Later modules register their own error classes here, keeping this map the single source."""
    STATUS_BY_ERROR[error] = status


def status_for(error: SpoolError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def envelope(error: SpoolError, request_id: str | None) -> dict[str, Any]:
    return {
        "error": {
            "code": error.code,
            "message": error.message,
            "details": error.details,
            "suggestions": error.suggestions,
            "request_id": request_id,
        }
    }


# The ``type`` OpenAI's SDKs read beside ``code`` and ``param`` (``error.type``), by status.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_envelope(error: SpoolError, request_id: str | None) -> dict[str, Any]:
    """Spool's envelope, with the two fields OpenAI SDKs also read: ``type`` and ``param``."""
    body = envelope(error, request_id)
    status = status_for(error)
    body["error"]["type"] = OPENAI_ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body["error"]["param"] = error.details.get("param")
    return body


# What a 400 names of a body's fields: a body of 300,000 unknown keys answered 31 MB (Lambda: 6 MB).
MAX_FIELD_ERRORS = 20  # fields named; the rest are counted
MAX_FIELD_NAME = 200  # characters of each name (a key may be megabytes long)
TAKES_NO_BODY = "This operation takes no body"


def unwanted_body(value: Any) -> list[tuple[str, ...]]:
    """Where a parsed body sent to an operation that takes none holds something it refuses: nothing
    for ``{}`` or ``null``; each key of any other object (fields a client meant for another
    operation); the body itself for anything else. The rule of every function's no-body routes."""
    if value is None or value == {}:
        return []
    if isinstance(value, dict):
        return [("body", str(name)) for name in value]
    return [("body",)]
