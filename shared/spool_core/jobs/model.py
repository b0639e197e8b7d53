"""Jobs as the API takes them, as stored, and the chunk log's entries."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from spool_core.chat import Message
from spool_core.json_values import JsonBool, json_numbers
from spool_core.metadata import Metadata

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
# The largest cursor a reader may send: every JSON client reads it exactly, DynamoDB keys hold it.
MAX_SEQUENCE_ID = 2**53 - 1
# The sort key of a job's end mark in the chunk table: after every chunk, never read as one.
END_SEQUENCE_ID = MAX_SEQUENCE_ID + 1
JOB_TTL_SECONDS = 30 * 24 * 3600  # a job, its log and its idempotency record are kept this long
# How a stored job item is read (``Job.model_validate(item, context=STORED)``): its request may hold
# no messages, the job's ``messages_blob`` naming where they are (spool_core.jobs.stored).
STORED: dict[str, bool] = {"stored": True}
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running"})


class JobRequest(BaseModel):
    """``POST /v1/jobs`` body. ``message`` is shorthand for one user message."""

    model_config = ConfigDict(extra="forbid")

    context_id: str | None = Field(default=None, max_length=64)
    messages: list[Message] = Field(default_factory=list, max_length=1000)
    message: str | None = Field(default=None, max_length=2_000_000)
    model: str = Field(default="default", min_length=1, max_length=128)
    max_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    metadata: Metadata = Field(default_factory=dict)
    fallback: JsonBool = True

    _numbers = json_numbers("max_tokens", "temperature")

    @model_validator(mode="after")
    def _one_form_of_messages(self, info: ValidationInfo) -> JobRequest:
        if self.message is not None:
            if self.messages:
                raise ValueError("send either 'message' or 'messages', not both")
            self.messages = [Message(role="user", content=self.message)]
            self.message = None
        if not self.messages and not (info.context or {}).get("stored"):
            raise ValueError("send 'messages' (a list of {role, content}) or 'message' (text)")
        return self

    def fingerprint(self, surface: str | None = None, echo: dict[str, Any] | None = None) -> str:
        """SHA-256 of the canonical body (normalized: ``message`` becomes ``messages``), and for a job
        an OpenAI surface made, of that surface and what its answer echoes of the request: the same
        messages sent as a chat completion and as a response (or as a background one and not) are
        different requests under one key. ``POST /v1/jobs`` (no surface) keeps the body's alone."""
        body = self.model_dump(exclude={"message"})
        document = body if surface is None else {"body": body, "surface": surface, "echo": echo}
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Progress(BaseModel):
    tokens_generated: int = 0
    last_sequence_id: int = 0
    chunks_written: int = 0

    @classmethod
    def up_to(cls, last: Chunk | None) -> Progress:
        """A job's progress as its log says it, up to its last chunk (None: nothing written)."""
        if last is None:
            return cls()
        return cls(
            tokens_generated=last.tokens_total,
            last_sequence_id=last.sequence_id,
            chunks_written=last.sequence_id,
        )


class Usage(BaseModel):
    estimated_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class Segment(BaseModel):
    """Where a model took over the job's output: its chunks start at ``from_sequence_id``, its tokens
    after ``from_tokens`` (a job that fell back mid-stream has more than one)."""

    model: str
    from_sequence_id: int = 1
    from_tokens: int = 0


class JobSummary(BaseModel):
    """What a job's listing shows (the job resource without output): the fields the jobs table's
    list indexes project, so a page of them is one Query and never reads a job's messages or output."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    status: Status
    model_requested: str
    model_resolved: str
    fallback_used: bool = False
    segments: list[Segment] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    usage: Usage = Field(default_factory=Usage)
    cost_nanos: int = 0
    error: dict[str, Any] | None = None
    finish_reason: str | None = None  # a completed job's: stop | length | content_filter
    created_at: str
    started_at: str | None = None
    first_token_at: str | None = None
    completed_at: str | None = None
    attempts: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


# The job item's attributes a listing reads (the list indexes' projection in template.yaml).
SUMMARY_FIELDS: tuple[str, ...] = tuple(JobSummary.model_fields)


class Job(JobSummary):
    """The job item. Worker-only fields (lease, attempts) stay out of the API's view."""

    tenant_id: str
    request: JobRequest
    fingerprint: str
    input_reported: dict[str, int] = Field(default_factory=dict)  # input tokens providers reported, by model
    output: str | None = None
    estimate: dict[str, Any] | None = None  # how admission estimated the tokens (for learning)
    # The context version admission counted (its manifest's key): every attempt of the job reads this
    # one, so a PATCH or the context's expiry after the job was accepted changes nothing of it.
    context_manifest: str | None = None
    reservation: dict[str, Any] | None = None  # what admission reserved (settled when the job ends)
    cancel_requested: bool = False
    # A WebSocket client subscribed: from then on the worker marks its chunks ``live``, and only live
    # chunks reach the fanout (the chunk stream's filter), so a job nobody subscribes to costs no fanout.
    subscribed: bool = False
    lease_token: str | None = None  # the current lease (unique per take); also marks its holder's writes
    lease_expires_ms: int = 0
    ended_by: str | None = None  # the token of whoever wrote the end (a retried end recognizes its own)
    # What the OpenAI surface that made the job shows of its request and the job does not keep (the
    # Responses API's ``background``, and whether its first system message was ``instructions``).
    echo: dict[str, Any] | None = None
    # The SHA-256 of the request's messages, kept in S3 when they are too large for the item (every
    # write of which is billed by its size): ``request.messages`` is then empty, and the worker reads
    # them from S3 (spool_core.jobs.stored).
    messages_blob: str | None = None

    def lease_live(self, now_ms: int) -> bool:
        return self.lease_expires_ms > now_ms


class Chunk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sequence_id: int
    text: str
    created_at: str
    tokens: int = 0
    tokens_total: int = 0  # tokens generated up to and including this chunk: the resume point
    writer: str | None = None  # the lease token of the attempt that wrote it
    live: bool | None = None  # written while the job had a WebSocket subscriber (stored only when true)

    def public(self) -> dict[str, Any]:
        return {"sequence_id": self.sequence_id, "text": self.text, "created_at": self.created_at}


class EndMark(BaseModel):
    """How a job ended, as ``done`` tells it: written in the chunk table after the job's last chunk,
    in the same transaction as its end, when the job has a WebSocket subscriber. The chunk stream
    then carries the end behind every chunk, so the fanout sends ``done`` in order, from the record."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    status: Status
    usage: Usage
    cost_nanos: int = 0
    error: dict[str, Any] | None = None
    last_sequence_id: int = 0

    @classmethod
    def of(cls, job: Job) -> EndMark:
        return cls(
            job_id=job.job_id,
            status=job.status,
            usage=job.usage,
            cost_nanos=job.cost_nanos,
            error=job.error,
            last_sequence_id=job.progress.last_sequence_id,
        )
