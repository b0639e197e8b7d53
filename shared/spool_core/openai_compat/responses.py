"""The Responses API (background mode included) over a Spool job.

A response is a job: ``resp_<x>`` is job ``job_<x>``. Its event stream is derived from the chunk log
alone, so every event's ``sequence_number`` is the same however often it is replayed:

    0 response.created, 1 response.in_progress, 2 response.output_item.added,
    3 response.content_part.added, 3 + k the delta of chunk k (k = 1..N),
    N + 4 response.output_text.done, N + 5 response.content_part.done, N + 6 response.output_item.done,
    N + 7 response.completed | response.incomplete | response.failed

``starting_after=S`` starts at the chunk after S - 3, so a client that kept the last number it saw
resumes exactly there, for the life of the log, across worker crashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spool_core.chat import Message
from spool_core.errors import Gone, InvalidRequest, NotFound
from spool_core.events import Ended, Followed, Ping, Revoked, TimeUp, Wait
from spool_core.jobs.model import Job, JobRequest
from spool_core.json_values import JsonBool, json_numbers
from spool_core.openai_compat.common import PING, created_epoch, data_line, text_of, to_job
from spool_core.openai_compat.params import schema_error

PREFIX_EVENTS = 3  # created, in_progress, output_item.added, content_part.added: numbers 0..3
ID_PREFIX = "resp_"


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "message"):
            raise ValueError(
                f"input items of type {str(kind)[:40]!r} are not supported: Spool takes messages"
                " ({role, content}) with text"
            )
        return value


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_tokens_name: ClassVar[str] = "max_output_tokens"  # what the job's max_tokens is called here

    model: str = Field(min_length=1, max_length=128)
    input: str | Annotated[list[InputMessage], Field(max_length=1000)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    # not passed on (README), but a value OpenAI refuses is refused
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    background: JsonBool = False
    stream: JsonBool = False
    metadata: dict[str, Any] | None = None
    context_id: str | None = Field(default=None, max_length=64)
    fallback: JsonBool = True

    _numbers = json_numbers("max_output_tokens", "temperature", "top_p")

    @field_validator("input")
    @classmethod
    def _text_only(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(value, list):
            if not value:
                raise ValueError("input must not be empty")
            for i, item in enumerate(value):
                text_of(item.content, f"input[{i}].content")
        return value

    SURFACE: ClassVar[str] = "responses"

    def echo(self) -> dict[str, Any]:
        """What a response shows of this request and its job does not keep."""
        return {"background": self.background, "instructions": bool(self.instructions)}

    def job_request(self) -> JobRequest:
        # plain values: the job's model checks them, so its limits are 400s naming the field
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            for i, item in enumerate(self.input):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": text_of(item.content, f"input[{i}].content")})
        try:
            return to_job(messages, self, self.max_output_tokens)
        except InvalidRequest as error:
            raise self._in_request_terms(error) from None

    def _in_request_terms(self, error: InvalidRequest) -> InvalidRequest:
        """The job's limits named as this request sent the text: the job's ``messages.0`` is
        ``instructions`` when given, then ``input`` (a string) or ``input[i]``."""
        given = 1 if self.instructions else 0

        def param(field: str) -> str:
            parts = field.split(".")
            if parts == ["messages"]:  # the whole list (too many): the input's
                return "input"
            if parts[0] != "messages" or len(parts) < 2 or not parts[1].isdigit():
                return field
            index, rest = int(parts[1]), [p for p in parts[2:] if p != "content"]
            if index < given:
                return ".".join(["instructions", *rest])
            name = "input" if isinstance(self.input, str) else f"input[{index - given}].content"
            return ".".join([name, *rest])

        fields = [{**f, "field": param(str(f["field"]))} for f in error.details.get("fields", [])]
        if not fields:
            return error
        return schema_error(fields, error.details, error.suggestions)


# ---------------------------------------------------------------------------------------- ids
def response_id(job_id: str) -> str:
    return ID_PREFIX + job_id.removeprefix("job_")


def message_id(job_id: str) -> str:
    return "msg_" + job_id.removeprefix("job_")


def not_found(response: str) -> NotFound:
    """The 404 of a response id that names no response of the tenant (told by the id it asked for)."""
    return NotFound(
        f"Response '{response[:80]}' not found",
        details={"response_id": response[:80]},
        suggestions=["Use the id returned by POST /v1/responses (resp_...)"],
    )


def job_id_of(response: str) -> str:
    if not response.startswith(ID_PREFIX) or len(response) > 80:
        raise not_found(response)
    return "job_" + response.removeprefix(ID_PREFIX)


# ---------------------------------------------------------------------------------------- objects
def _status(job: Job) -> str:
    if job.status == "completed":
        return "completed" if (job.finish_reason or "stop") == "stop" else "incomplete"
    return {"queued": "queued", "running": "in_progress"}.get(job.status, job.status)


def _incomplete_details(job: Job) -> dict[str, str] | None:
    if _status(job) != "incomplete":
        return None
    return {"reason": "max_output_tokens" if job.finish_reason == "length" else "content_filter"}


def _error(job: Job) -> dict[str, Any] | None:
    if job.status != "failed":
        return None
    error = job.error or {}
    code = str(error.get("code") or "job_failed")
    openai_code = "rate_limit_exceeded" if "limit" in code else "server_error"
    return {"code": openai_code, "message": str(error.get("message") or "The job failed"), "spool_code": code}


def _usage(job: Job) -> dict[str, Any]:
    return {
        "input_tokens": job.usage.input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": job.usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job.usage.input_tokens + job.usage.output_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(job: Job, text: str, done: bool) -> dict[str, Any]:
    # as the response's own: an answer cut at max_output_tokens is incomplete, not completed
    status = "in_progress" if not done else "completed" if _status(job) == "completed" else "incomplete"
    return {
        "type": "message",
        "id": message_id(job.job_id),
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)] if done or text else [],
    }


def _echo(job: Job) -> dict[str, Any]:
    """What the response echoes of its request. A job made by another route (``POST /v1/jobs``), or
    before jobs kept it, reads as a background response whose leading system message is its
    instructions."""
    return job.echo or {"background": True, "instructions": True}


def instructions_of(job: Job, messages: Callable[[Job], Sequence[Message]]) -> str | None:
    """The response's ``instructions``: its first message, a system one, when the request had them.
    When the messages are in S3, short instructions are kept beside them (``echo``), and longer ones
    are read from there with ``messages`` (the job's messages); gone from there, they read as null."""
    echo = _echo(job)
    if not echo.get("instructions"):
        return None
    if job.messages_blob and "instructions_text" in echo:
        return str(echo["instructions_text"])
    try:
        stored = messages(job) if job.messages_blob else job.request.messages
    except Gone:  # the request's object expired (days after the job's end)
        return None
    first = stored[0] if stored else None
    return first.content if first and first.role == "system" else None


def response_object(job: Job, output: str | None, instructions: str | None) -> dict[str, Any]:
    """The response resource of a job; ``output`` is the text so far (None: not read yet), and
    ``instructions`` as ``instructions_of`` gives them."""
    terminal = job.terminal
    echo = _echo(job)
    items = [message_item(job, output or "", terminal)] if terminal or output else []
    return {
        "id": response_id(job.job_id),
        "object": "response",
        "created_at": created_epoch(job),
        "status": _status(job),
        "background": bool(echo.get("background")),
        "model": job.model_resolved,
        "output": items,
        "usage": _usage(job) if terminal else None,
        "error": _error(job),
        "incomplete_details": _incomplete_details(job),
        "instructions": instructions,
        "max_output_tokens": job.request.max_tokens,
        "metadata": job.request.metadata,
        "temperature": job.request.temperature,
        "top_p": None,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": True,
        "spool": {"job_id": job.job_id, "status": job.status, "cost_usd": job.cost_nanos / 1e9},
    }


# ---------------------------------------------------------------------------------------- events
def first_chunk_after(starting_after: int | None) -> int:
    """The chunk log cursor a stream starting after event ``starting_after`` reads from."""
    return 0 if starting_after is None else max(0, starting_after - PREFIX_EVENTS)


def response_events(
    job: Job,
    followed: Iterator[Followed],
    starting_after: int | None,
    output_of: Callable[[Job], str],
    instructions: str | None,
) -> Iterator[str | Wait]:
    """The response's events with ``sequence_number`` > ``starting_after`` (all when None), from
    ``followed`` (the log read from ``first_chunk_after(starting_after)``). Ends after the terminal
    event, or early at the stream's time limit (the client resumes with ``starting_after``).
    ``output_of`` reads an ended job's whole text when the stream did not read it all;
    ``instructions`` as ``instructions_of`` gives them."""
    after = -1 if starting_after is None else starting_after
    item_id = message_id(job.job_id)
    where: dict[str, Any] = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def event(number: int, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": number, **fields}
        return f"event: {kind}\n{data_line(payload)}"

    # The opening events show the response as it was when it started, however late they are read: a
    # background response is created queued, another (the request waits for it) in progress, as OpenAI's.
    opening = {**response_object(job, None, instructions), "output": [], "usage": None, "error": None}
    opening["incomplete_details"] = None
    created = "queued" if opening["background"] else "in_progress"
    prefix: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": {**opening, "status": created}}),
        ("response.in_progress", {"response": {**opening, "status": "in_progress"}}),
        ("response.output_item.added", {"output_index": 0, "item": message_item(job, "", False)}),
        ("response.content_part.added", {**where, "part": _text_part("")}),
    ]
    for number, (kind, fields) in enumerate(prefix):
        if number > after:
            yield event(number, kind, **fields)
    texts: list[str] | None = [] if after < PREFIX_EVENTS else None  # the whole text, when read whole
    for item in followed:
        if isinstance(item, Wait):
            yield item
        elif isinstance(item, Ping):
            yield PING
        elif isinstance(item, TimeUp | Revoked):
            return  # the client resumes with `starting_after` (refused with 401 once its key is revoked)
        elif isinstance(item, dict):
            number = PREFIX_EVENTS + item["sequence_id"]
            if texts is not None:
                texts.append(item["text"])
            if number > after:
                yield event(number, "response.output_text.delta", **where, delta=item["text"], logprobs=[])
        elif isinstance(item, Ended):
            text = "".join(texts) if texts is not None else output_of(item.job)
            yield from _ending(item.job, after, text, instructions, event, where)
            return


def _ending(
    job: Job, after: int, text: str, instructions: str | None, event: Any, where: dict[str, Any]
) -> Iterator[str]:
    base = PREFIX_EVENTS + job.progress.last_sequence_id
    final = response_object(job, text, instructions)
    terminal = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        final["status"], "response.failed" if job.status == "failed" else "response.incomplete"
    )
    endings: list[tuple[str, dict[str, Any]]] = [
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": _text_part(text)}),
        ("response.output_item.done", {"output_index": 0, "item": message_item(job, text, True)}),
        (terminal, {"response": final}),
    ]
    for offset, (kind, fields) in enumerate(endings, start=1):
        if base + offset > after:
            yield event(base + offset, kind, **fields)


__all__ = [
    "ResponsesRequest",
    "first_chunk_after",
    "instructions_of",
    "job_id_of",
    "message_item",
    "response_events",
    "response_id",
    "response_object",
]
