"""What the chat and Responses surfaces share: SSE data lines, text content, times, and errors in
the shape OpenAI SDKs read (``error.message``, ``error.type``, ``error.param``, ``error.code``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from spool_core.api.errors import openai_envelope, register_status
from spool_core.errors import InvalidRequest, SpoolError
from spool_core.jobs.model import Job, JobRequest
from spool_core.openai_compat.params import UnsupportedParameter, validated

PING = ": ping\n\n"  # a comment: OpenAI SDKs skip it (an `event:` line without data would break them)


def data_line(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def created_epoch(job: Job) -> int:
    return int(datetime.fromisoformat(job.created_at.replace("Z", "+00:00")).timestamp())


def text_of(content: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (``text``, ``input_text``, ``output_text``);
    anything else (images, audio, files, tool results) is refused by name, and a text part whose
    ``text`` is not a string is a schema error naming that field."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in {"text", "input_text", "output_text"}:
            raise UnsupportedParameter(
                f"Content of type {kind!r} ({param}[{j}]) is not supported: Spool takes text only",
                details={"param": f"{param}[{j}]"},
                suggestions=["Send the message content as a string or as text parts"],
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(
                f"{param}[{j}].text must be a string (the part's text), not {_json_type(text)}",
                details={"param": f"{param}[{j}].text"},
                suggestions=[f'Send the part as {{"type": "{kind}", "text": "..."}}'],
            )
        texts.append(text)
    return "".join(texts)


def _json_type(value: Any) -> str:
    if value is None:
        return "missing or null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


# ---------------------------------------------------------------------------------------- errors


def to_job(
    messages: list[dict[str, str]],
    request: Any,
    max_tokens: int | None,
) -> JobRequest:
    """The Spool job an OpenAI request stands for: its messages, and the fields both APIs share
    (``model``, ``temperature``, ``metadata``, and Spool's ``fallback`` and ``context_id``)."""
    fields: dict[str, Any] = {
        "messages": messages,
        "model": request.model,
        "metadata": request.metadata or {},
        "fallback": request.fallback,
        "context_id": request.context_id,
    }
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if request.temperature is not None:
        fields["temperature"] = request.temperature
    return validated(JobRequest, fields)  # the job's own limits (1,000 messages, 2 MB of text): a 400


def in_request_terms(error: SpoolError, name: str) -> SpoolError:
    """An admission error as the request named the job's ``max_tokens`` (``max_output_tokens`` on the
    Responses API, ``max_completion_tokens`` when a chat request sent that): in the message, the
    suggestions and ``param``."""
    if name == "max_tokens":
        return error
    error.message = error.message.replace("max_tokens", name)
    error.args = (error.message,)
    error.suggestions = [s.replace("max_tokens", name) for s in error.suggestions]
    if error.details.get("param") == "max_tokens":
        error.details["param"] = name
    if "max_tokens" in error.details:
        error.details[name] = error.details.pop("max_tokens")
    return error


class _JobNotAnswered(SpoolError):
    """An error behind which a job was made: it names the job (``X-Spool-Job-Id``), and SDKs must not
    retry it by themselves (``x-should-retry: false``): a retry without the same ``Idempotency-Key``
    is a new, paid, generation."""

    def __init__(self, job_id: str, message: str, *, details: dict[str, Any], suggestions: list[str]) -> None:
        super().__init__(message, details=details, suggestions=suggestions)
        self.headers = {"x-should-retry": "false", "X-Spool-Job-Id": job_id}


def partial_output_at(job_id: str) -> str:
    return f"The partial output stays readable at GET /v1/jobs/{job_id}"


class JobFailed(_JobNotAnswered):
    """The job behind a non-streamed answer failed: its own error, as a 502 (the model's side
    failed) that SDKs must not retry blindly (each retry would be a new, paid, generation)."""

    code = "job_failed"

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        super().__init__(
            job.job_id,
            str(error.get("message") or f"Job {job.job_id} failed"),
            details={**(error.get("details") or {}), "job_id": job.job_id, "job_error": error.get("code")},
            suggestions=[*(error.get("suggestions") or []), partial_output_at(job.job_id)],
        )
        self.code = str(error.get("code") or self.code)  # type: ignore[misc]


register_status(JobFailed, 502)


class JobCancelled(_JobNotAnswered):
    """The job behind a non-streamed answer was cancelled (``POST /v1/jobs/{id}/cancel``) before it
    ended: its text is cut short, so it is not answered as a complete ``chat.completion``. Not to be
    retried blindly either (a retry is a new, paid, generation)."""

    code = "job_cancelled"

    def __init__(self, job: Job) -> None:
        super().__init__(
            job.job_id,
            cancelled_message(job),
            details={"job_id": job.job_id, "output_tokens": job.usage.output_tokens},
            suggestions=[partial_output_at(job.job_id), "Send the request again for a whole answer"],
        )


register_status(JobCancelled, 409)


def cancelled_message(job: Job) -> str:
    return (
        f"Job {job.job_id} was cancelled after {job.usage.output_tokens} output tokens; "
        "the answer is incomplete"
    )


class StillRunning(_JobNotAnswered):
    """A non-streamed answer whose job outlived the request's time: the job goes on. Like a failure,
    not one to retry blindly: a retry without the same ``Idempotency-Key`` is a new, paid, job."""

    code = "timeout"

    def __init__(self, job_id: str, *, response_id: str | None = None) -> None:
        """``response_id``: the answer is a Responses API response, read back by its own id."""
        if response_id is None:
            where, follow, instead = f"/v1/jobs/{job_id}", f"GET /v1/jobs/{job_id}/events", "stream: true"
        else:
            where = f"/v1/responses/{response_id}"
            follow, instead = f"GET {where}?stream=true", "stream: true, or background: true"
        super().__init__(
            job_id,
            f"Job {job_id} is still running; its answer will be at GET {where}",
            details={"job_id": job_id} | ({"response_id": response_id} if response_id else {}),
            suggestions=[
                f"Read the answer when the job ends at GET {where}, or follow it with {follow}",
                f"Ask for long answers with {instead}",
            ],
        )


register_status(StillRunning, 504)


class _StreamError(SpoolError):
    """An error met after a stream's status line was sent: written as its last event."""

    def __init__(self, code: str, message: str, details: dict[str, Any], suggestions: list[str]) -> None:
        super().__init__(message, details=details, suggestions=suggestions)
        self.code = code  # type: ignore[misc]


def _stream_error(error: SpoolError, request_id: str | None) -> dict[str, Any]:
    """A mid-stream error event: the envelope of any other error OpenAI SDKs read (``openai_envelope``:
    they raise ``APIError`` with its message, after the text received so far), the job's id and the
    last chunk read also at the top, where the first version put them."""
    body = openai_envelope(error, request_id)
    body["error"].update({k: error.details[k] for k in ("job_id", "last_sequence_id") if k in error.details})
    return body


def job_failure(job: Job, request_id: str | None = None) -> dict[str, Any]:
    """The error event of a job that failed or was cancelled."""
    details: dict[str, Any] = {"job_id": job.job_id, "last_sequence_id": job.progress.last_sequence_id}
    if job.status == "cancelled":
        code, message, suggestions = "job_cancelled", cancelled_message(job), [partial_output_at(job.job_id)]
    else:
        error = job.error or {}
        code = error.get("code") or "job_failed"
        message = str(error.get("message") or "The job failed")
        suggestions = [*(error.get("suggestions") or []), partial_output_at(job.job_id)]
        details = {**(error.get("details") or {}), **details}
    return _stream_error(_StreamError(code, message, details, list(suggestions)), request_id)


def key_revoked(job_id: str, last_sequence_id: int, request_id: str | None = None) -> dict[str, Any]:
    """The key the stream was opened with was revoked (or expired) while it ran; the job goes on."""
    from spool_core.auth import revoked_key_error  # loaded by the stream's key check already

    resume = (
        f"read the rest with an active key, GET /v1/jobs/{job_id}/events"
        f" and 'Last-Event-ID: {last_sequence_id}'"
    )
    error = revoked_key_error(job_id, last_sequence_id, resume)
    return _stream_error(error, request_id)


def stream_time_up(job_id: str, last_sequence_id: int, request_id: str | None = None) -> dict[str, Any]:
    """The stream reached its time limit before the job ended: how to read the rest."""
    read_rest = f"GET /v1/jobs/{job_id}/events and 'Last-Event-ID: {last_sequence_id}'"
    error = _StreamError(
        "stream_time_limit",
        f"The stream reached its time limit; job {job_id} goes on. Read the rest with {read_rest}",
        {"job_id": job_id, "last_sequence_id": last_sequence_id},
        [f"Read the rest with {read_rest}"],
    )
    return _stream_error(error, request_id)


__all__ = [
    "PING",
    "JobCancelled",
    "JobFailed",
    "StillRunning",
    "created_epoch",
    "data_line",
    "job_failure",
    "key_revoked",
    "stream_time_up",
    "text_of",
]
