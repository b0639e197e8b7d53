"""``POST /v1/chat/completions`` over a Spool job: the request becomes a job request, the job's end
becomes a ``chat.completion``, and its chunk log becomes ``chat.completion.chunk`` events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spool_core.errors import InvalidRequest
from spool_core.events import Ended, Followed, Ping, Revoked, TimeUp, Wait
from spool_core.jobs.model import Job, JobRequest
from spool_core.json_values import JsonBool, json_numbers
from spool_core.openai_compat.common import (
    PING,
    created_epoch,
    data_line,
    job_failure,
    key_revoked,
    stream_time_up,
    text_of,
    to_job,
)
from spool_core.openai_compat.params import UnsupportedParameter

DONE_LINE = "data: [DONE]\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: JsonBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to be looked at (tool calls), never passed on

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The parameters Spool honours (``params.ChatPolicy`` decides about the others)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    # not passed on (README), but a value OpenAI refuses is refused
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: JsonBool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, Any] | None = None
    context_id: str | None = Field(default=None, max_length=64)
    fallback: JsonBool = True

    _numbers = json_numbers("max_tokens", "max_completion_tokens", "temperature", "top_p")

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for i, message in enumerate(messages):
            for name in ("tool_calls", "function_call"):  # dropped, the conversation would change
                if (message.model_extra or {}).get(name):
                    raise UnsupportedParameter(
                        f"messages[{i}].{name} is not supported: Spool's models take text only",
                        details={"param": f"messages[{i}].{name}"},
                        suggestions=["Send the conversation as text messages, without tool calls"],
                    )
            if message.content is None:  # as OpenAI: only a message of tool calls has no content
                raise InvalidRequest(
                    f"messages[{i}].content is null: a message needs its text",
                    details={
                        "param": f"messages[{i}].content",
                        "fields": [{"field": f"messages[{i}].content", "message": "a string or text parts"}],
                    },
                    suggestions=[f"Send messages[{i}].content as a string, or leave the message out"],
                )
            text_of(message.content, f"messages[{i}].content")
        return messages

    @model_validator(mode="after")
    def _one_output_limit(self) -> ChatRequest:
        """Both names of the output limit with different values: which one was meant is not Spool's to
        guess (OpenAI refuses the pair; the same value twice is taken)."""
        if None not in (self.max_tokens, self.max_completion_tokens) and (
            self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequest(
                f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens})"
                " disagree: send one of them",
                details={
                    "param": "max_tokens",
                    "fields": [
                        {"field": "max_tokens", "message": "sent with a different max_completion_tokens"}
                    ],
                },
                suggestions=["Send max_completion_tokens alone (max_tokens is its older name)"],
            )
        return self

    @model_validator(mode="after")
    def _stream_options_with_a_stream(self) -> ChatRequest:
        """As OpenAI answers: a request that is not streamed has no stream to set options of."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true",
                details={
                    "param": "stream_options",
                    "fields": [{"field": "stream_options", "message": "only with stream: true"}],
                },
                suggestions=["Send stream: true, or leave stream_options out"],
            )
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    SURFACE: ClassVar[str] = "chat.completions"

    def echo(self) -> None:
        """A completion shows nothing of its request that the job does not keep."""
        return None

    def job_request(self) -> JobRequest:
        messages = [  # plain values: the job's model checks them, so its limits are 400s naming the field
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": text_of(m.content, f"messages[{i}].content"),
            }
            for i, m in enumerate(self.messages)
        ]
        return to_job(messages, self, self.max_completion_tokens or self.max_tokens)

    @property
    def max_tokens_name(self) -> str:
        """What this request called the job's ``max_tokens`` (the name its refusals use)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def _usage(job: Job) -> dict[str, int]:
    return {
        "prompt_tokens": job.usage.input_tokens,
        "completion_tokens": job.usage.output_tokens,
        "total_tokens": job.usage.input_tokens + job.usage.output_tokens,
    }


def completion(job: Job, output: str) -> dict[str, Any]:
    """The ``chat.completion`` of a completed job (a failed or cancelled one is an error instead)."""
    return {
        "id": completion_id(job.job_id),
        "object": "chat.completion",
        "created": created_epoch(job),
        "model": job.model_resolved,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": output, "refusal": None},
                "finish_reason": job.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": _usage(job),
        "spool": {"job_id": job.job_id, "status": job.status, "cost_usd": job.cost_nanos / 1e9},
    }


def _chunk(job: Job, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": completion_id(job.job_id),
        "object": "chat.completion.chunk",
        "created": created_epoch(job),
        "model": job.model_resolved,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def completion_chunks(
    job: Job, followed: Iterator[Followed], include_usage: bool, request_id: str | None = None
) -> Iterator[str | Wait]:
    """The job's log as ``chat.completion.chunk`` events, ``[DONE]`` last. A failed or cancelled job
    ends with an error event in Spool's envelope (OpenAI SDKs raise it, after the text received so
    far) and no ``[DONE]``, which a client could take for a finished answer; so does a stream whose
    time ran out (its message says how to read the rest) or whose key was revoked. ``request_id``:
    the stream's request, named in its error."""
    yield data_line(_chunk(job, {"role": "assistant", "content": ""}))
    last = 0
    for item in followed:
        if isinstance(item, Wait):
            yield item
        elif isinstance(item, Ping):
            yield PING
        elif isinstance(item, dict):
            last = item["sequence_id"]
            yield data_line(_chunk(job, {"content": item["text"]}))
        elif isinstance(item, TimeUp):
            yield data_line(stream_time_up(job.job_id, last, request_id))
            return
        elif isinstance(item, Revoked):
            yield data_line(key_revoked(job.job_id, last, request_id))
            return
        elif isinstance(item, Ended):
            ended = item.job
            if ended.status in ("failed", "cancelled"):
                yield data_line(job_failure(ended, request_id))
                return
            yield data_line(_chunk(ended, {}, ended.finish_reason or "stop"))
            if include_usage:
                yield data_line({**_chunk(ended, {}), "choices": [], "usage": _usage(ended)})
            yield DONE_LINE
            return


__all__ = ["ChatRequest", "completion", "completion_chunks", "completion_id"]
