"""Spool's dev-side package: the client, the CLI, the embedded stack. Never shipped to Lambda."""

from spool.aio import AsyncClient
from spool.client import Client
from spool.errors import (
    Conflict,
    ConnectionFailed,
    Gone,
    InvalidRequest,
    JobCancelled,
    JobEnded,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    SpoolError,
    SyncError,
    Unauthorized,
)

__all__ = [
    "AsyncClient",
    "Client",
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
]
