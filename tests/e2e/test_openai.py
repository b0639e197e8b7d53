"""The official openai SDK against the embedded stack, with only base_url and api_key changed:
models, chat completions streamed and not, background responses broken off and resumed with
starting_after (across a worker crash too), cancel, and its exceptions for Spool's errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.support import ROOT, wait_for

RESPONSE_EVENTS_BEFORE_TEXT = 4  # created, in_progress, output_item.added, content_part.added


@pytest.fixture
def sdk(dev_stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{dev_stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)


def job_of(dev_stack: RunningStack, job_id: str) -> dict[str, Any]:
    status, _, job = dev_stack.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200
    return job  # type: ignore[no-any-return]


def test_models_list_as_an_openai_list(sdk: openai.OpenAI) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert {"sim-fast", "sim-realtime"} <= set(models)
    fast = models["sim-fast"]
    assert (fast.object, fast.owned_by) == ("model", "simulated")
    assert isinstance(fast.created, int) and fast.created > 0
    assert (
        fast.model_extra is not None and fast.model_extra["pricing"]["output_per_mtok"] > 0
    )  # Spool's fields


def test_a_model_retrieved_by_id_or_alias_as_the_sdk_reads_it(sdk: openai.OpenAI) -> None:
    fast = sdk.models.retrieve("sim-fast")
    assert (fast.id, fast.object, fast.owned_by) == ("sim-fast", "model", "simulated")
    assert fast.model_extra is not None and fast.model_extra["context_window"] > 0
    assert sdk.models.retrieve("sim-chat").id == next(
        m.id for m in sdk.models.list() if "sim-chat" in (m.model_extra or {}).get("aliases", [])
    )
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.models.retrieve("gpt-nope")
    assert "not available" in str(unknown.value)
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("sim-preview")  # rolled out to other tenants only


def test_a_streamed_chat_completion_equals_the_plain_one_and_both_are_jobs(
    sdk: openai.OpenAI, dev_stack: RunningStack
) -> None:
    request: dict[str, Any] = {
        "model": "sim-realtime",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is Spool?"},
        ],
        "max_tokens": 60,
    }
    raw = sdk.chat.completions.with_raw_response.create(**request)
    plain = raw.parse()
    job_id = raw.headers["x-spool-job-id"]
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens == 60
    job = job_of(dev_stack, job_id)
    assert (job["status"], job["output"]) == ("completed", text)  # a Spool job like any other
    assert plain.id == f"chatcmpl-{job_id}"

    chunks = list(sdk.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 60


def test_the_same_idempotency_key_gets_the_same_job(sdk: openai.OpenAI) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    request: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": "once"}],
        "max_tokens": 20,
    }
    first = sdk.chat.completions.with_raw_response.create(**request, extra_headers=key)
    again = sdk.chat.completions.with_raw_response.create(**request, extra_headers=key)
    assert first.headers["x-spool-job-id"] == again.headers["x-spool-job-id"]
    assert first.parse().choices[0].message.content == again.parse().choices[0].message.content
    # the same messages under the same key by another surface, or as a response that echoes the
    # request differently, are other requests: a 422, never the chat job read back as a response
    same = {"model": "sim-fast", "input": "once", "max_output_tokens": 20}
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        sdk.responses.create(**same, extra_headers=key)
    assert reused.value.code == "idempotency_key_reused"
    other = {"Idempotency-Key": str(uuid.uuid4())}
    response = sdk.responses.create(**same, background=True, extra_headers=other)
    assert sdk.responses.create(**same, background=True, extra_headers=other).id == response.id
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.responses.create(**same, background=False, extra_headers=other)


def jobs_since(dev_stack: RunningStack, newest_before: str | None) -> list[str]:
    """The tenant's jobs created after ``newest_before`` (the list is newest first)."""
    status, _, page = dev_stack.request("GET", "/v1/jobs?limit=100")
    assert status == 200
    ids = [entry["job_id"] for entry in page["data"]]
    return ids[: ids.index(newest_before)] if newest_before in ids else ids


def newest_job(dev_stack: RunningStack) -> str | None:
    status, _, page = dev_stack.request("GET", "/v1/jobs?limit=1")
    assert status == 200
    return page["data"][0]["job_id"] if page["data"] else None


class LosesTheFirstReply(httpx2.HTTPTransport):
    """The first answer is read whole, then lost: the SDK sees a timeout, as after a dropped reply
    (once every client sharing ``together`` has lost its own)."""

    def __init__(self, together: threading.Barrier | None = None) -> None:
        super().__init__()
        self.lost: list[str] = []
        self.together = together

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        if self.lost:
            return response
        response.read()
        self.lost.append(response.headers["x-spool-job-id"])
        response.close()
        if self.together is not None:
            self.together.wait(timeout=120)
        raise httpx2.ReadTimeout("the reply was lost", request=request)


def lossy_sdk(dev_stack: RunningStack, transport: httpx2.HTTPTransport) -> openai.OpenAI:
    sdk = openai.OpenAI(
        base_url=f"{dev_stack.base_url}/v1",
        api_key=DEV_KEY,
        max_retries=2,
        http_client=httpx2.Client(transport=transport),
    )
    sdk._calculate_retry_timeout = lambda *args, **kwargs: 0.0  # type: ignore[method-assign]
    return sdk


def test_an_sdk_retry_after_a_lost_reply_gets_the_same_job(dev_stack: RunningStack) -> None:
    """OpenAI's SDKs send no Idempotency-Key and retry a request whose reply did not come: each retry
    was a new job, generated and paid again. A retry (``x-stainless-retry-count``) of the same bytes
    takes the key its request was given; a request the caller sends again itself is a new job."""
    transport = LosesTheFirstReply()
    sdk = lossy_sdk(dev_stack, transport)
    request: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"once only {uuid.uuid4()}"}],
        "max_tokens": 30,
    }
    before = newest_job(dev_stack)
    answer = sdk.chat.completions.with_raw_response.create(**request)
    assert transport.lost == [answer.headers["x-spool-job-id"]]
    assert jobs_since(dev_stack, before) == transport.lost
    assert job_of(dev_stack, transport.lost[0])["output"] == answer.parse().choices[0].message.content
    again = sdk.chat.completions.with_raw_response.create(**request)  # the caller's own second request
    assert again.headers["x-spool-job-id"] != transport.lost[0]


def test_retries_of_the_same_bytes_sent_at_once_are_not_folded_into_one_job(dev_stack: RunningStack) -> None:
    """Three callers send the same request at once (samples of one prompt) and each loses its reply:
    every retry took the key of the last first attempt, and all three got that one job's answer. A
    retry cannot say whose it is, so none is folded: each caller gets a job of its own."""
    together = threading.Barrier(3)
    transports = [LosesTheFirstReply(together) for _ in range(3)]
    request: dict[str, Any] = {
        "model": "sim-fast",
        "messages": [{"role": "user", "content": f"a sample {uuid.uuid4()}"}],
        "max_tokens": 30,
    }

    def ask(transport: LosesTheFirstReply) -> str:
        answer = lossy_sdk(dev_stack, transport).chat.completions.with_raw_response.create(**request)
        return str(answer.headers["x-spool-job-id"])

    with ThreadPoolExecutor(max_workers=3) as pool:
        delivered = list(pool.map(ask, transports))
    assert len(set(delivered)) == 3, delivered
    first_attempts = {t.lost[0] for t in transports}
    assert len(first_attempts) == 3 and not first_attempts & set(delivered)  # retries are new jobs


def test_sdk_retries_after_its_timeout_wait_for_the_one_job(dev_stack: RunningStack) -> None:
    """A client timeout shorter than the answer: every retry waits for the job the first attempt
    made. Whether the last retry saw the answer depends on the machine's speed; the job count does not."""
    sent: list[httpx2.Request] = []
    sdk = openai.OpenAI(
        base_url=f"{dev_stack.base_url}/v1",
        api_key=DEV_KEY,
        timeout=1.0,
        max_retries=4,
        http_client=httpx2.Client(event_hooks={"request": [sent.append]}),
    )
    before = newest_job(dev_stack)
    try:
        answer = sdk.chat.completions.with_raw_response.create(
            model="sim-realtime",  # 50 tokens a second: 150 tokens outlive the first attempt
            messages=[{"role": "user", "content": f"take your time {uuid.uuid4()}"}],
            max_tokens=150,
        )
        answered = answer.headers["x-spool-job-id"]
    except openai.APITimeoutError:
        answered = None
    assert len(sent) >= 2  # the first attempt timed out, and was retried
    made = jobs_since(dev_stack, before)
    assert len(made) == 1 and answered in (None, made[0])
    wait_for(lambda: job_of(dev_stack, made[0])["status"] == "completed", timeout=120)


def test_a_chunked_body_reaches_a_streaming_route(dev_stack: RunningStack) -> None:
    """The local stack forwarded the client's Transfer-Encoding with the body already read: the app
    waited for chunks that never came, and the request hung until the client gave up."""
    for path, body in (("/v1/responses/resp_x/cancel", b""), ("/v1/chat/completions", b"{bad")):
        answer = httpx2.post(
            f"{dev_stack.base_url}{path}",
            content=iter([body]),  # a generator: sent chunked
            headers={"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"},
            timeout=60,
        )
        assert answer.request.headers["transfer-encoding"] == "chunked"
        assert answer.status_code in {400, 404}, answer.text


def finished(sdk: openai.OpenAI, response_id: str) -> Any:
    return wait_for(
        lambda: (r := sdk.responses.retrieve(response_id)).status not in {"queued", "in_progress"} and r,
        what=f"response {response_id} to end",
    )


def read_events(stream: Any, stop_after: int | None = None) -> list[Any]:
    events = []
    for event in stream:
        events.append(event)
        if stop_after is not None and len(events) >= stop_after:
            stream.close()  # the client walks away mid-stream
            break
    return events


def resume_to_the_end(sdk: openai.OpenAI, response_id: str, events: list[Any]) -> list[Any]:
    """Keep resuming with the last sequence_number seen until a terminal event (a stream may end at
    its time limit, as the e2e stack's do every few seconds)."""
    while events[-1].type not in {"response.completed", "response.failed", "response.incomplete"}:
        events += read_events(
            sdk.responses.retrieve(response_id, stream=True, starting_after=events[-1].sequence_number)
        )
    return events


def assert_contiguous(events: list[Any], final: Any) -> None:
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers))), numbers  # no gap, no duplicate
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == final.output_text


def test_a_response_reads_back_as_it_was_asked_for(sdk: openai.OpenAI) -> None:
    """``background`` and ``instructions`` as the request sent them, whenever the response is read:
    created, retrieved, streamed or cancelled (a system message in ``input`` is not instructions)."""
    plain = sdk.responses.create(
        model="sim-fast",
        input=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}],
        max_output_tokens=3,
    )
    assert (plain.background, plain.instructions) == (False, None)
    again = sdk.responses.retrieve(plain.id)
    assert (again.background, again.instructions) == (False, None)
    events = read_events(sdk.responses.create(model="sim-fast", input="hi", max_output_tokens=3, stream=True))
    assert [
        e.response.background for e in events if e.type in {"response.created", "response.completed"}
    ] == [
        False,
        False,
    ]
    asked = sdk.responses.create(
        model="sim-realtime", input="hi", instructions="Be brief", background=True, max_output_tokens=500
    )
    cancelled = sdk.responses.cancel(asked.id)
    assert (asked.background, asked.instructions) == (True, "Be brief")
    assert (cancelled.background, cancelled.instructions) == (True, "Be brief")


def test_a_background_response_broken_off_resumes_with_starting_after(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(
        model="sim-realtime", input="Tell me about durable logs", background=True, max_output_tokens=150
    )
    assert created.status in {"queued", "in_progress"} and created.background
    events = read_events(
        sdk.responses.retrieve(created.id, stream=True), stop_after=RESPONSE_EVENTS_BEFORE_TEXT + 3
    )
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    events = resume_to_the_end(sdk, created.id, events)
    final = sdk.responses.retrieve(created.id)
    assert final.status == "completed" and events[-1].type == "response.completed"
    assert final.usage is not None and final.usage.output_tokens == 150
    assert_contiguous(events, final)
    again = read_events(sdk.responses.retrieve(created.id, stream=True, starting_after=5))
    assert [e.sequence_number for e in again] == [e.sequence_number for e in events[6:]]  # stable numbers


def test_a_worker_crash_during_a_resumed_stream_changes_nothing_the_client_sees(sdk: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": "sim-realtime", "input": "crash under me", "max_output_tokens": 200}
    clean = sdk.responses.create(**request, background=True)
    crashing = sdk.responses.create(
        **request, background=True, metadata={"simulate": {"fault": "crash", "at_token": 80}}
    )
    events = read_events(
        sdk.responses.retrieve(crashing.id, stream=True), stop_after=RESPONSE_EVENTS_BEFORE_TEXT + 2
    )
    events = resume_to_the_end(sdk, crashing.id, events)  # the worker dies at token 80 meanwhile
    final = sdk.responses.retrieve(crashing.id)
    assert final.status == "completed"
    assert_contiguous(events, final)
    assert final.output_text == finished(sdk, clean.id).output_text


def test_a_response_streamed_from_its_creation_as_the_sdk_helper_reads_it(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model="sim-fast", input="helper", max_output_tokens=40) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text
    events = read_events(sdk.responses.retrieve(final.id, stream=True))
    assert_contiguous(events, final)


def test_cancel_keeps_the_partial_output(sdk: openai.OpenAI, dev_stack: RunningStack) -> None:
    created = sdk.responses.create(
        model="sim-realtime", input="a long one", background=True, max_output_tokens=3000
    )
    events = read_events(
        sdk.responses.retrieve(created.id, stream=True), stop_after=RESPONSE_EVENTS_BEFORE_TEXT + 2
    )
    assert events[-1].type == "response.output_text.delta"
    cancelled = sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    job = job_of(dev_stack, cancelled.model_extra["spool"]["job_id"])  # type: ignore[index]
    assert job["status"] == "cancelled"
    assert cancelled.output_text == job["output"] and 0 < job["usage"]["output_tokens"] < 3000
    assert sdk.responses.cancel(created.id).status == "cancelled"  # idempotent


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_unsupported_parameters_are_a_400_naming_them(
    sdk: openai.OpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "x"}], **params)
    assert caught.value.param == param
    assert caught.value.code == "unsupported_parameter"
    assert param in caught.value.message and "not supported" in caught.value.message


def test_harmless_parameters_are_accepted(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "x"}],
        max_completion_tokens=5,
        user="u-1",
        seed=7,
        top_p=0.9,
        n=1,
        store=True,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 5


def test_sdk_exceptions_carry_spools_messages(sdk: openai.OpenAI, dev_stack: RunningStack) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.retrieve("resp_nothinghere")
    assert "Response 'resp_nothinghere' not found" in missing.value.message  # not the job behind it
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.cancel("resp_nothinghere")
    assert "Response 'resp_nothinghere' not found" in missing.value.message
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=f"{dev_stack.base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert "API key" in unauthorized.value.message
    key = {"Idempotency-Key": str(uuid.uuid4())}
    sdk.chat.completions.create(
        model="sim-fast", messages=[{"role": "user", "content": "a"}], max_tokens=3, extra_headers=key
    )
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        sdk.chat.completions.create(
            model="sim-fast", messages=[{"role": "user", "content": "b"}], max_tokens=3, extra_headers=key
        )
    assert reused.value.code == "idempotency_key_reused"


def test_a_tenant_over_its_token_limit_gets_a_rate_limit_error(dev_stack: RunningStack) -> None:
    env = {**os.environ, "SPOOL_URL": dev_stack.base_url}

    def spool(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spool.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    key = spool("keys", "create", "--tenant", "openai-limited")
    spool(
        "limits",
        "set",
        "--tenant",
        "openai-limited",
        "--tokens-per-minute",
        "500",
        "--tokens-per-day",
        "100000",
        "--max-concurrent-jobs",
        "2",
    )
    limited = openai.OpenAI(base_url=f"{dev_stack.base_url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        limited.chat.completions.create(
            model="sim-fast", messages=[{"role": "user", "content": "x"}], max_tokens=2000
        )
    assert caught.value.code == "token_limit_exceeded"
    assert "retry-after" in caught.value.response.headers


def test_a_long_prompt_is_answered_its_messages_kept_out_of_the_job_item(
    sdk: openai.OpenAI, dev_stack: RunningStack
) -> None:
    """A 300 KB prompt (~60,000 tokens of a 128,000-token window) was a 413: a job item held at most
    192 KB of messages. They go to S3 now, and the worker reads them from there."""
    long = "word " * 60_000
    completion = sdk.chat.completions.with_raw_response.create(
        model="sim-fast",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": long}],
        max_tokens=12,
    )
    answer = completion.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens > 60_000
    assert answer.choices[0].message.content
    status, _, job = dev_stack.request("GET", f"/v1/jobs/{completion.headers['x-spool-job-id']}")
    assert status == 200 and job["status"] == "completed"
    response = sdk.responses.create(
        model="sim-fast", instructions="Be brief.", input=long, max_output_tokens=12
    )
    assert response.status == "completed" and response.instructions == "Be brief."
    # Instructions too long to keep beside the messages are read back from where the messages are:
    # they read as null before.
    rules = "Answer in the voice of the project's style guide. " * 400  # ~20 KB: the messages go to S3
    # a short input: the tenant's per-minute tokens are shared with the tests after this one
    response = sdk.responses.create(model="sim-fast", instructions=rules, input="hi", max_output_tokens=12)
    assert response.status == "completed" and response.instructions == rules
    assert sdk.responses.retrieve(response.id).instructions == rules
    streamed = list(sdk.responses.retrieve(response.id, stream=True))
    assert streamed[0].response.instructions == streamed[-1].response.instructions == rules
