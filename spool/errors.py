"""What the Spool client raises: the server's error envelope as typed exceptions, a job that ended
without completing, a server that could not be reached, and a directory that cannot be synced."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class SpoolError(Exception):
    """An error answer from Spool, with what it says: code, details, suggestions, request id."""

    def __init__(
        self, status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None
    ) -> None:
        error = (body or {}).get("error") or {}
        self.status = status
        self.code: str = error.get("code", "http_error")
        self.message: str = error.get("message", f"HTTP {status}")
        self.details: dict[str, Any] = error.get("details") or {}
        self.suggestions: list[str] = error.get("suggestions") or []
        self.request_id: str | None = error.get("request_id")
        self.headers = dict(headers or {})
        super().__init__(f"{self.code}: {self.message}")


class InvalidRequest(SpoolError):
    pass


class Unauthorized(SpoolError):
    pass


class NotFound(SpoolError):
    pass


class Conflict(SpoolError):
    pass


class Gone(SpoolError):
    pass


class RateLimited(SpoolError):
    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks to wait (``Retry-After``), None when it did not say."""
        for name, value in self.headers.items():
            if name.lower() == "retry-after":
                try:
                    return max(0.0, float(value))
                except ValueError:
                    return None
        return None


class ServerError(SpoolError):
    pass


class ConnectionFailed(SpoolError):
    """Spool could not be reached: connection refused, DNS, a timeout or a broken answer, after
    the client's retries."""

    def __init__(self, url: str, reason: str, *, answered: bool = True) -> None:
        """``answered=False``: the server took the connection and did not answer in time."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        local = host in {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
        if not answered:
            suggestions = [
                "The server is there but did not answer: it may be busy or hung (its log says which)",
                "`spool health --timeout 5` asks once, for at most 5 s",
            ]
        elif parts.scheme not in ("http", "https") or not host:  # retrying cannot fix the address
            suggestions = [
                "SPOOL_URL (or --url) must be an http:// or https:// URL with a host,"
                " such as http://127.0.0.1:8000 or your stack's ApiUrl output"
            ]
        elif local:
            suggestions = [
                "Is the stack running? Start it with `make dev`",
                "Or point SPOOL_URL at a running stack",
            ]
        else:
            suggestions = [
                "Check SPOOL_URL and your network",
                "Retry in a moment: the server may be restarting",
            ]
        body = {
            "error": {
                "code": "connection_failed",
                "message": f"Could not reach Spool at {url}: {reason}",
                "details": {"url": url, "reason": reason},
                "suggestions": suggestions,
            }
        }
        super().__init__(0, body)
        self.url = url
        self.reason = reason
        self.answered = answered

    def after(self, attempts: int) -> ConnectionFailed:
        """This failure as a caller sees it after ``attempts`` tries: how many there were."""
        if attempts <= 1:
            return self
        return ConnectionFailed(self.url, f"{self.reason} (asked {attempts} times)", answered=self.answered)


class JobEnded(SpoolError):
    """A streamed job ended without completing: every chunk written was yielded before this."""

    def __init__(self, result: Mapping[str, Any], last_sequence_id: int) -> None:
        error = result.get("error") or {}
        body = {"error": {**self.default_error(), **error}}
        super().__init__(200, body)
        self.job_id: str = result.get("job_id", "")
        self.status: str = result.get("status", "")  # type: ignore[assignment]
        self.last_sequence_id = last_sequence_id
        self.usage: dict[str, Any] | None = result.get("usage")
        self.cost_usd: float | None = result.get("cost_usd")
        self.result = dict(result)

    @staticmethod
    def default_error() -> dict[str, Any]:
        return {"code": "job_failed", "message": "The job failed"}


class JobFailed(JobEnded):
    """The job ended ``failed``: ``code``, ``message`` and ``details`` are the job's ``error``."""


class JobCancelled(JobEnded):
    """The job ended ``cancelled`` (by its owner): its partial output stays readable."""

    @staticmethod
    def default_error() -> dict[str, Any]:
        return {"code": "job_cancelled", "message": "The job was cancelled"}


class SyncError(ValueError):
    """A directory that cannot become a context: missing, not a directory, nothing uploadable."""


_BY_STATUS: dict[int, type[SpoolError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: InvalidRequest,
    422: Conflict,
    429: RateLimited,
}


def error_for(status: int, body: Any, headers: Mapping[str, str]) -> SpoolError:
    """The typed exception for an error answer (the one status-to-exception map)."""
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else SpoolError)
    return cls(status, body if isinstance(body, dict) else None, headers)


__all__ = [
    "Conflict",
    "ConnectionFailed",
    "Gone",
    "InvalidRequest",
    "JobCancelled",
    "JobEnded",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "ServerError",
    "SpoolError",
    "SyncError",
    "Unauthorized",
    "error_for",
]
