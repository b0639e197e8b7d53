"""The OpenAI-compatible surface's logic with no network: the parameter policy, request mapping, the
chat chunk stream, the Responses event numbering (stable under any starting_after), and how the
official SDK reads Spool's error bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from spool_core.api.errors import openai_envelope
from spool_core.errors import (
    Conflict,
    DependencyUnavailable,
    InvalidRequest,
    NotFound,
    SpoolError,
    Unauthorized,
    Unprocessable,
)
from spool_core.events import Ended, Followed, Ping, TimeUp, Wait
from spool_core.jobs.model import Job
from spool_core.limits.errors import RateLimited
from spool_core.openai_compat import chat, responses
from spool_core.openai_compat.common import JobCancelled, JobFailed, StillRunning
from spool_core.openai_compat.params import ChatPolicy, ResponsesPolicy, UnsupportedParameter, parse

pytestmark = pytest.mark.unit


def job(status: str = "completed", chunks: int = 3, **fields: Any) -> Job:
    return Job.model_validate(
        {
            "job_id": "job_abc",
            "tenant_id": "t",
            "status": status,
            "request": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30},
            "fingerprint": "f",
            "model_requested": "sim-fast",
            "model_resolved": "sim-fast",
            "created_at": "2026-11-27T00:00:00.000Z",
            "progress": {"last_sequence_id": chunks, "chunks_written": chunks, "tokens_generated": 30},
            "usage": {"input_tokens": 4, "output_tokens": 30},
            "finish_reason": "stop" if status == "completed" else None,
            "attempts": 1,
            **fields,
        }
    )


def log(n: int = 3, end: Job | None = None, *, after: int = 0) -> Iterator[Followed]:
    for i in range(after + 1, n + 1):
        if i == 2:
            yield Wait(0.05)
            yield Ping()
        yield {"sequence_id": i, "text": f"t{i} ", "created_at": "x"}
    yield Ended(end or job(chunks=n))


def sse(lines: Iterator[str | Wait]) -> list[Any]:
    """Data payloads (JSON, or the [DONE] marker) and comments of a stream, waits dropped."""
    out: list[Any] = []
    for text in lines:
        if isinstance(text, Wait):
            continue
        for block in text.split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data: "):
                    raw = line.removeprefix("data: ")
                    out.append(raw if raw == "[DONE]" else json.loads(raw))
                elif line.startswith(":"):
                    out.append(line)
    return out


# ---------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"presence_penalty": False}, "presence_penalty"),  # JSON's false is not the number 0
        ({"n": True}, "n"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"stop": "END"}, "stop"),
        ({"made_up": 1}, "made_up"),
    ],
)
def test_chat_parameters_that_would_change_the_answer_are_refused_by_name(
    extra: dict[str, Any], param: str
) -> None:
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(UnsupportedParameter) as caught:
        parse(chat.ChatRequest, body, ChatPolicy)
    assert caught.value.details["param"] == param and param in caught.value.message


@pytest.mark.parametrize("name", ["tool_calls", "function_call"])
def test_an_earlier_tool_call_in_the_conversation_is_refused_not_dropped(name: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, name: [call]}]
    with pytest.raises(UnsupportedParameter) as caught:
        parse(chat.ChatRequest, {"model": "sim-fast", "messages": messages}, ChatPolicy)
    assert caught.value.details["param"] == f"messages[1].{name}"
    empty = [{"role": "assistant", "content": "y", "tool_calls": [], "name": "bot"}]  # nothing dropped
    request = parse(chat.ChatRequest, {"model": "sim-fast", "messages": empty}, ChatPolicy)
    assert [(m.role, m.content) for m in request.job_request().messages] == [("assistant", "y")]


def test_a_message_without_content_is_refused_naming_it() -> None:
    """``content: null`` on a user message was accepted and generated from nothing, where OpenAI
    answers 400 (only a message of tool calls may have no content, and those are refused here)."""
    for role in ("user", "system", "assistant"):
        body = {
            "model": "sim-fast",
            "messages": [{"role": "user", "content": "x"}, {"role": role, "content": None}],
        }
        with pytest.raises(InvalidRequest) as caught:
            parse(chat.ChatRequest, body, ChatPolicy)
        assert caught.value.details["param"] == "messages[1].content" and "null" in caught.value.message


def test_both_names_of_the_output_limit_must_agree() -> None:
    """``max_tokens=30, max_completion_tokens=40`` was taken as 40 without a word; OpenAI refuses it."""
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as caught:
        parse(chat.ChatRequest, {**body, "max_tokens": 30, "max_completion_tokens": 40}, ChatPolicy)
    assert caught.value.details["param"] == "max_tokens" and "max_completion_tokens" in caught.value.message
    same = parse(chat.ChatRequest, {**body, "max_tokens": 40, "max_completion_tokens": 40}, ChatPolicy)
    assert same.job_request().max_tokens == 40


@pytest.mark.parametrize("stop", ["", [], None])
def test_an_empty_stop_changes_nothing_and_passes(stop: Any) -> None:
    """README: an empty ``stop`` is accepted; ``stop: ""`` was refused as a stop sequence."""
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}], "stop": stop}
    assert parse(chat.ChatRequest, body, ChatPolicy).job_request().max_tokens == 1024


@pytest.mark.parametrize(
    ("reasoning", "accepted"),
    [
        ({}, True),
        ({"effort": None}, True),
        ({"effort": None, "summary": None}, True),
        ({"effort": "low"}, False),
    ],
)
def test_responses_reasoning_passes_only_when_it_asks_for_nothing(reasoning: Any, accepted: bool) -> None:
    """The SDKs send ``reasoning={"effort": None}`` for an effort left unset: it was refused."""
    body = {"model": "sim-fast", "input": "x", "reasoning": reasoning}
    if accepted:
        parse(responses.ResponsesRequest, body, ResponsesPolicy)
        return
    with pytest.raises(UnsupportedParameter) as caught:
        parse(responses.ResponsesRequest, body, ResponsesPolicy)
    assert caught.value.details["param"] == "reasoning"


def test_stream_options_without_a_stream_is_refused_as_openai_does() -> None:
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as caught:
        parse(chat.ChatRequest, {**body, "stream_options": {"include_usage": True}}, ChatPolicy)
    assert caught.value.details["param"] == "stream_options" and "stream" in caught.value.message
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    assert parse(chat.ChatRequest, streamed, ChatPolicy).include_usage
    assert not parse(chat.ChatRequest, {**body, "stream_options": None}, ChatPolicy).include_usage


def test_neutral_values_and_harmless_parameters_pass() -> None:
    body = {
        "model": "sim-fast",
        "messages": [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}],
            }
        ],
        "n": 1,
        "logprobs": False,
        "tools": [],
        "response_format": {"type": "text"},
        "stop": None,
        "user": "u",
        "seed": 1,
        "top_p": 1,
        "store": False,
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "context_id": "ctx_1",
    }
    request = parse(chat.ChatRequest, body, ChatPolicy)
    job_request = request.job_request()
    assert [(m.role, m.content) for m in job_request.messages] == [("system", "Be brief")]
    assert (job_request.max_tokens, job_request.temperature, job_request.context_id) == (7, 0.5, "ctx_1")
    assert request.include_usage


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": "x"}, "seed"),
        ({"seed": True}, "seed"),
        ({"user": 5}, "user"),
        ({"store": "yes"}, "store"),
        ({"service_tier": "bogus"}, "service_tier"),
        ({"top_p": 2}, "top_p"),
        ({"tools": False}, "tools"),
    ],
)
def test_an_ignored_parameter_with_a_value_openai_refuses_is_refused_too(
    extra: dict[str, Any], param: str
) -> None:
    """They change nothing here, but a client's bug that OpenAI would answer with a 400 was accepted."""
    for model, policy, body in (
        (chat.ChatRequest, ChatPolicy, {"messages": [{"role": "user", "content": "x"}]}),
        (responses.ResponsesRequest, ResponsesPolicy, {"input": "x"}),
    ):
        if param not in policy.IGNORED and param not in policy.NEUTRAL:
            continue
        with pytest.raises(InvalidRequest) as caught:
            parse(model, {"model": "sim-fast", **body, **extra}, policy)
        assert caught.value.details["param"] == param and param in caught.value.message
    fine = {"seed": 7, "user": "u", "store": True, "service_tier": "auto", "top_p": 0.5, "tools": None}
    parse(
        chat.ChatRequest,
        {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}], **fine},
        ChatPolicy,
    )


def test_non_text_content_and_other_roles_are_refused() -> None:
    image = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    with pytest.raises(UnsupportedParameter) as caught:
        parse(chat.ChatRequest, image, ChatPolicy)
    assert caught.value.details["param"] == "messages[0].content[0]"
    tool = {"model": "m", "messages": [{"role": "tool", "content": "x"}]}
    with pytest.raises(InvalidRequest) as bad_role:
        parse(chat.ChatRequest, tool, ChatPolicy)
    assert bad_role.value.details["param"] == "messages.0.role"
    with pytest.raises(InvalidRequest):
        parse(chat.ChatRequest, ["not", "an", "object"], ChatPolicy)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "text", "text": 5},
        {"type": "text"},
        {"type": "input_text", "text": None},
        {"type": "text", "text": []},
    ],
)
def test_a_text_part_without_a_string_is_a_schema_error_naming_its_text(part: dict[str, Any]) -> None:
    """It was refused as "Content of type 'text' is not supported", which no one can act on."""
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    with pytest.raises(InvalidRequest) as caught:
        parse(chat.ChatRequest, body, ChatPolicy)
    assert not isinstance(caught.value, UnsupportedParameter)
    assert caught.value.details["param"] == "messages[0].content[0].text"
    assert "must be a string" in caught.value.message and "not supported" not in caught.value.message


def test_a_parameter_sent_as_null_is_left_out_as_openai_reads_it() -> None:
    """The SDKs send ``null`` for ``param=None``: it changes nothing, so it is no 400."""
    chat_body = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": "x"}],
        **dict.fromkeys(("stream", "reasoning_effort", "audio", "prediction", "web_search_options")),
        **dict.fromkeys(("max_tokens", "temperature", "metadata", "stream_options", "tools")),
    }
    request = parse(chat.ChatRequest, chat_body, ChatPolicy)
    assert request.stream is False and request.job_request().max_tokens == 1024
    responses_body = {"model": "sim-fast", "input": "x", "stream": None, "background": None, "fallback": None}
    assert parse(responses.ResponsesRequest, responses_body, ResponsesPolicy).background is False
    with pytest.raises(InvalidRequest) as caught:
        parse(chat.ChatRequest, {**chat_body, "messages": None}, ChatPolicy)  # required: still required
    assert caught.value.details["param"] == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": "50"}, "max_completion_tokens"),
        ({"temperature": "0.2"}, "temperature"),
        ({"top_p": 5}, "top_p"),  # ignored, but not whatever it is: OpenAI takes 0 to 1
        ({"top_p": "0.5"}, "top_p"),
        ({"stream": "false"}, "stream"),  # a non-empty string was a stream
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_chat_numbers_and_booleans_are_json_as_written(extra: dict[str, Any], param: str) -> None:
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(InvalidRequest) as caught:
        parse(chat.ChatRequest, body, ChatPolicy)
    assert caught.value.details["param"] == param
    whole = parse(chat.ChatRequest, {**body, **{param.split(".")[0]: None}, "max_tokens": 50.0}, ChatPolicy)
    assert whole.job_request().max_tokens == 50  # a whole number, however JSON writes it


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ({}, True),
        ({"format": {"type": "text"}}, True),
        ({"verbosity": "medium"}, True),
        ({"format": None, "verbosity": None}, True),
        ({"format": {"type": "text"}, "verbosity": "high"}, False),  # was accepted and ignored
        ({"verbosity": "low"}, False),
        ({"format": {"type": "json_object"}}, False),
        ({"other": 1}, False),
        ("text", False),
    ],
)
def test_responses_text_options_pass_only_when_they_change_nothing(text: Any, accepted: bool) -> None:
    body = {"model": "sim-fast", "input": "x", "text": text}
    if accepted:
        parse(responses.ResponsesRequest, body, ResponsesPolicy)
    else:
        with pytest.raises(UnsupportedParameter) as caught:
            parse(responses.ResponsesRequest, body, ResponsesPolicy)
        assert caught.value.details["param"] == "text"


def test_responses_input_and_instructions_become_messages() -> None:
    body = {
        "model": "sim-fast",
        "instructions": "Answer in French",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Bonjour"}]},
            {"type": "message", "role": "assistant", "content": "Salut"},
            {"role": "user", "content": "Et alors?"},
        ],
        "max_output_tokens": 9,
        "background": True,
        "store": True,
        "tools": [],
        "text": {"format": {"type": "text"}},
    }
    request = parse(responses.ResponsesRequest, body, ResponsesPolicy)
    job_request = request.job_request()
    assert [m.role for m in job_request.messages] == ["system", "user", "assistant", "user"]
    assert job_request.messages[1].content == "Bonjour" and job_request.max_tokens == 9
    for refused in (
        {"previous_response_id": "resp_1"},
        {"include": ["x"]},
        {"text": {"format": {"type": "json_schema"}}},
    ):
        with pytest.raises(UnsupportedParameter):
            parse(responses.ResponsesRequest, {**body, **refused}, ResponsesPolicy)


TOO_LONG = "w" * 2_000_001  # over the job's 2,000,000 characters of a message


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": "x", "instructions": TOO_LONG}, "instructions", "at most 2000000 characters"),
        ({"input": TOO_LONG}, "input", "at most 2000000 characters"),
        (
            {
                "instructions": "y",
                "input": [{"role": "user", "content": "a"}, {"role": "user", "content": TOO_LONG}],
            },
            "input[1].content",
            "at most 2000000 characters",
        ),
        ({"input": [{"role": "user", "content": "a"}] * 1001}, "input", "at most 1000 items"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input.0",
            "items of type 'function_call_output' are not supported",
        ),
        ({"input": [{"role": "tool", "content": "a"}]}, "input.0.role", "'system', 'developer', 'user'"),
        ({"input": 5}, "input", "valid string"),
        ({"input": [{"role": "user", "content": 5}]}, "input.0.content", "valid string"),  # a list sent
        ({"instructions": "i", "input": [{"role": "user", "content": "a"}] * 1000}, "input", "at most 1000"),
    ],
)
def test_a_responses_refusal_names_the_field_the_request_sent(
    body: dict[str, Any], param: str, says: str
) -> None:
    """Not the job's ``messages.N`` (``instructions`` comes first there), and not every member of
    ``input``'s union: only the form the client sent."""
    given = {"model": "sim-fast", **body}
    with pytest.raises(InvalidRequest) as refused:
        parse(responses.ResponsesRequest, given, ResponsesPolicy).job_request()
    error = refused.value
    assert error.details["param"] == param, error.message
    assert says in error.message and "messages." not in error.message and "input.str" not in error.message
    assert {f["field"] for f in error.details["fields"]} == {param}


# ---------------------------------------------------------------------------------------- chat
def test_chat_chunks_role_first_text_then_finish_usage_and_done() -> None:
    out = sse(chat.completion_chunks(job(status="running"), log(3), include_usage=True))
    data = [o for o in out if isinstance(o, dict)]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data if d["choices"]) == "t1 t2 t3 "
    assert data[-2]["choices"][0]["finish_reason"] == "stop"
    assert data[-1]["choices"] == [] and data[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 30,
        "total_tokens": 34,
    }
    assert out[-1] == "[DONE]" and ": ping" in out
    assert {d["id"] for d in data} == {"chatcmpl-job_abc"} and all("error" not in d for d in data)


def test_a_failed_job_ends_the_chat_stream_with_an_error_the_sdk_raises() -> None:
    failed = job(
        status="failed", error={"code": "provider_error", "message": "engine died", "suggestions": ["retry"]}
    )
    out = sse(
        chat.completion_chunks(job(status="running"), log(2, failed), include_usage=False, request_id="r1")
    )
    error = out[-1]["error"]
    assert error["message"] == "engine died" and error["code"] == "provider_error"
    assert "[DONE]" not in out
    # Spool's envelope, as every error: the contract checker found no details and no request_id
    assert error["request_id"] == "r1" and error["details"]["job_id"] == error["job_id"] == "job_abc"
    assert error["suggestions"][0] == "retry" and "job_abc" in error["suggestions"][-1]
    assert error["details"]["last_sequence_id"] == 3 and error["type"] == "server_error"


def test_a_cancelled_job_ends_the_chat_stream_with_an_error_not_a_finish() -> None:
    """It ended with ``finish_reason: "stop"`` and ``[DONE]``: a cut-off answer looked complete."""
    cancelled = job(status="cancelled", usage={"input_tokens": 4, "output_tokens": 2})
    out = sse(chat.completion_chunks(job(status="running"), log(2, cancelled), include_usage=True))
    texts = [d["choices"][0]["delta"].get("content") for d in out if isinstance(d, dict) and d.get("choices")]
    assert texts == ["", "t1 ", "t2 "]  # the text so far, then the error
    assert out[-1]["error"]["code"] == "job_cancelled" and out[-1]["error"]["job_id"] == "job_abc"
    assert "after 2 output tokens" in out[-1]["error"]["message"]
    assert "[DONE]" not in out and not any(
        isinstance(d, dict) and d.get("choices") and d["choices"][0]["finish_reason"] for d in out
    )


def test_a_chat_stream_out_of_time_says_how_to_read_the_rest() -> None:
    def timed_out() -> Iterator[Followed]:
        yield {"sequence_id": 1, "text": "a", "created_at": "x"}
        yield TimeUp()

    out = sse(chat.completion_chunks(job(status="running"), timed_out(), include_usage=False))
    assert out[-1]["error"]["code"] == "stream_time_limit"
    assert "Last-Event-ID: 1" in out[-1]["error"]["message"]
    assert out[-1]["error"]["details"] == {"job_id": "job_abc", "last_sequence_id": 1}
    assert out[-1]["error"]["suggestions"] and "request_id" in out[-1]["error"]


def test_a_completion_of_an_ended_job() -> None:
    body = chat.completion(job(finish_reason="length"), "the text")
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "the text", "refusal": None},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert body["object"] == "chat.completion" and body["created"] == 1795737600


# ---------------------------------------------------------------------------------------- responses
def numbered(
    starting_after: int | None, end: Job | None = None, n: int = 3, **fields: Any
) -> list[dict[str, Any]]:
    after_chunk = responses.first_chunk_after(starting_after)
    events = responses.response_events(
        job(status="running", **fields),
        log(n, end or job(chunks=n), after=after_chunk),
        starting_after,
        lambda j: "t1 t2 t3 ",
        None,
    )
    return [o for o in sse(events) if isinstance(o, dict)]


def test_response_events_are_numbered_from_the_log_alone() -> None:
    events = numbered(None)
    assert [e["sequence_number"] for e in events] == list(range(11))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["output"] == []
    assert events[0]["response"]["background"]  # a job of another route reads as a background response


def test_a_streamed_response_that_is_not_in_the_background_is_created_in_progress() -> None:
    """As OpenAI's: only a background response is ever queued (the SDK tester saw `queued` on a
    plain `stream=True` response, which OpenAI never sends)."""
    events = numbered(None, echo={"background": False, "instructions": False})
    assert [e["response"]["status"] for e in events[:2]] == ["in_progress", "in_progress"]
    assert not events[0]["response"]["background"]
    assert events[7]["text"] == "t1 t2 t3 " and events[4]["logprobs"] == []
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "t1 t2 t3 "
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


@pytest.mark.parametrize("starting_after", range(-1, 11))
def test_starting_after_any_number_resumes_exactly_after_it(starting_after: int) -> None:
    whole = numbered(None)
    resumed = numbered(None if starting_after < 0 else starting_after)
    assert resumed == [e for e in whole if e["sequence_number"] > starting_after]


def test_failed_and_cancelled_responses_end_with_their_own_event() -> None:
    failed = job(status="failed", error={"code": "provider_error", "message": "boom"})
    last = numbered(None, failed)[-1]
    assert last["type"] == "response.failed"
    assert last["response"]["error"] == {
        "code": "server_error",
        "message": "boom",
        "spool_code": "provider_error",
    }
    cancelled = numbered(None, job(status="cancelled"))[-1]
    assert (cancelled["type"], cancelled["response"]["status"]) == ("response.incomplete", "cancelled")
    *_, item_done, truncated = numbered(None, job(finish_reason="length"))
    assert truncated["type"] == "response.incomplete"
    assert truncated["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    # its message as the response itself says: cut at max_output_tokens, not completed
    assert item_done["type"] == "response.output_item.done" and item_done["item"]["status"] == "incomplete"
    assert truncated["response"]["output"][0]["status"] == "incomplete"


def test_response_ids_map_to_jobs_and_nothing_else() -> None:
    assert responses.response_id("job_x1") == "resp_x1" and responses.job_id_of("resp_x1") == "job_x1"
    for bad in ("job_x1", "x", "resp_" + "a" * 100):
        with pytest.raises(NotFound):
            responses.job_id_of(bad)


# ---------------------------------------------------------------------------------------- the SDK
@pytest.mark.parametrize(
    ("error", "exception"),
    [
        (InvalidRequest("bad", details={"param": "model"}), openai.BadRequestError),
        (Unauthorized("who are you"), openai.AuthenticationError),
        (NotFound("no such response"), openai.NotFoundError),
        (Conflict("busy"), openai.ConflictError),
        (Unprocessable("reused key"), openai.UnprocessableEntityError),
        (RateLimited("slow down", retry_after_seconds=1), openai.RateLimitError),
        (
            JobFailed(job(status="failed", error={"code": "provider_error", "message": "engine died"})),
            openai.InternalServerError,
        ),
        (JobCancelled(job(status="cancelled")), openai.ConflictError),
        (StillRunning("job_abc"), openai.InternalServerError),
    ],
)
def test_the_sdk_raises_its_own_exception_with_spools_message(
    error: SpoolError, exception: type[Exception]
) -> None:
    from spool_core.api.errors import status_for

    body = openai_envelope(error, "req-1")

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            status_for(error), json=body, headers={"x-should-retry": "false", **error.headers}
        )

    client = openai.OpenAI(
        base_url="http://spool.test/v1",
        api_key="sk",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    with pytest.raises(exception) as caught:
        client.models.list()
    raised: Any = caught.value
    assert raised.message.endswith(error.message)
    assert raised.code == error.code and raised.param == error.details.get("param")
    assert raised.body["request_id"] == "req-1" and raised.body["suggestions"] is not None


@pytest.mark.parametrize(
    "error",
    [
        JobFailed(job(status="failed", error={"code": "provider_error", "message": "engine died"})),
        JobCancelled(job(status="cancelled")),
        StillRunning("job_abc"),
    ],
    ids=["failed", "cancelled", "still-running"],
)
def test_the_sdk_does_not_retry_an_answer_whose_job_was_made(error: SpoolError) -> None:
    """With its default retries the SDK asked again after a 504 (and would after a 409): each retry,
    without an Idempotency-Key, was a new job generated and paid again. The job is named instead."""
    from spool_core.api.errors import status_for

    calls: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return httpx2.Response(status_for(error), json=openai_envelope(error, "r"), headers=error.headers)

    client = openai.OpenAI(
        base_url="http://spool.test/v1",
        api_key="sk",
        max_retries=2,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "x"}])
    assert len(calls) == 1
    assert caught.value.response.headers["X-Spool-Job-Id"] == "job_abc"


def test_the_sdk_retries_an_error_that_made_no_job() -> None:
    """The control: the same client retries a 503 sent without the header (so the test above can fail)."""
    from spool_core.api.errors import status_for

    calls: list[httpx2.Request] = []
    error = DependencyUnavailable("the table is busy")

    def answer(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return httpx2.Response(
            status_for(error), json=openai_envelope(error, "r"), headers={"retry-after": "0"}
        )

    client = openai.OpenAI(
        base_url="http://spool.test/v1",
        api_key="sk",
        max_retries=1,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "x"}])
    assert len(calls) == 2


def test_an_idempotency_key_too_long_is_a_bad_request_naming_the_header_not_a_missing_one() -> None:
    from spool_core.jobs.errors import IdempotencyKeyRequired
    from spool_core.jobs.service import check_idempotency_key

    assert check_idempotency_key("k" * 255) == "k" * 255
    with pytest.raises(IdempotencyKeyRequired):
        check_idempotency_key("")
    with pytest.raises(InvalidRequest) as refused:
        check_idempotency_key("k" * 256)
    assert refused.value.code == "invalid_request"
    assert refused.value.details == {"field": "Idempotency-Key", "length": 256, "max_length": 255}
    assert refused.value.suggestions


def test_a_responses_instructions_are_read_from_where_its_messages_are() -> None:
    from spool_core.chat import Message
    from spool_core.jobs.stored import JobMessagesMissing

    stored = (Message(role="system", content="long rules"), Message(role="user", content="hi"))
    reads: list[str] = []

    def messages(j: Job) -> tuple[Message, ...]:
        reads.append(j.job_id)
        return stored

    def gone(j: Job) -> tuple[Message, ...]:
        raise JobMessagesMissing("expired")

    asked = {"background": False, "instructions": True}
    in_item = job(request={"messages": [m.model_dump() for m in stored], "max_tokens": 30}, echo=asked)
    assert responses.instructions_of(in_item, messages) == "long rules" and reads == []
    emptied = in_item.request.model_copy(update={"messages": []})  # as offload leaves the item
    in_s3 = in_item.model_copy(update={"request": emptied, "messages_blob": "ab" * 32})
    assert responses.instructions_of(in_s3, messages) == "long rules" and reads == ["job_abc"]
    assert responses.instructions_of(in_s3, gone) is None  # expired with the request: null, not a 500
    kept = in_s3.model_copy(update={"echo": {**asked, "instructions_text": "short"}})
    assert responses.instructions_of(kept, gone) == "short"
    none = in_s3.model_copy(update={"echo": {"background": False, "instructions": False}})
    assert responses.instructions_of(none, gone) is None
    assert responses.response_object(in_s3, "x", "long rules")["instructions"] == "long rules"


@pytest.mark.parametrize("surface", ["chat", "responses"])
def test_a_temperature_that_is_no_number_is_called_that_on_the_openai_surface(surface: str) -> None:
    from pydantic import ValidationError

    from spool_core.openai_compat import chat, responses

    model = chat.ChatRequest if surface == "chat" else responses.ResponsesRequest
    body = '{"model": "sim-fast", "temperature": NaN, "messages": [], "input": "hi"}'
    with pytest.raises(ValidationError) as refused:
        model.model_validate_json(body)
    assert [(e["loc"], e["type"]) for e in refused.value.errors() if e["loc"] == ("temperature",)] == [
        (("temperature",), "finite_number")
    ]
