"""The message the jobs API puts on the queue and the worker consumes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class JobMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    tenant_id: str


class MessageNotDone(Exception):
    """Raised by a record handler to leave its message on the queue (reported as a batch item failure)."""
