"""429s: each says which limit, the numbers, when to retry, and how to avoid it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from spool_core.errors import SpoolError


class RateLimited(SpoolError):
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        details: Mapping[str, Any] | None = None,
        suggestions: list[str] | None = None,
    ) -> None:
        super().__init__(message, details=details, suggestions=suggestions)
        self.retry_after_seconds = retry_after_seconds
        self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_seconds)))
        if suggestions is None:
            self.suggestions[:0] = self._leading_suggestions()

    def _leading_suggestions(self) -> list[str]:
        """Suggestions of the error's own, before its kind's defaults (none here)."""
        return []


class TokenLimitExceeded(RateLimited):
    code = "token_limit_exceeded"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Lower max_tokens: the reservation includes the output you allow",
        "Send less context (PATCH the context to drop files you do not need)",
    )

    def _leading_suggestions(self) -> list[str]:
        """The wait, as the Retry-After header says it, and when it ends."""
        at = f", at {self.details['reset_at']}" if "reset_at" in self.details else ""
        wait = f"Retry in {int(self.headers['Retry-After']):,} s (the Retry-After header){at},"
        return [f"{wait} when the limit has room for this job"]


class TooManyConcurrentJobs(RateLimited):
    code = "too_many_concurrent_jobs"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Wait for a running job to finish (or cancel one), then retry",
        "Ask for a higher concurrent-job limit",
    )


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Retry after the budget resets at midnight UTC",
        "Use a cheaper model (GET /v1/models lists prices) or lower max_tokens",
        "Ask for a higher daily budget",
    )
