"""The message the jobs API puts on the queue and the worker consumes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class JobMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    tenant_id: str
