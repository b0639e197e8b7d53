"""Spool's dev-side package: the client, the CLI, the embedded stack. Never shipped to Lambda.

Its names are imported when first used (PEP 562): the ``spool`` command starts with this package,
and a Ctrl-C while the client's libraries load (a quarter of a second) printed a traceback."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
_MODULES = {"AsyncClient": "spool.aio", "Client": "spool.client"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'spool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES.get(name, "spool.errors")), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
