"""The streaming function (Server-Sent Events) as Lambda Web Adapter runs it: its ASGI app under
uvicorn in a container, invoked with API Gateway proxy events (events/stream.json) against moto; and
the authorizer's events tokens (links.events)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool.devstack.runtime import LocalFunction, StreamedResponse
from spool.devstack.template import Template
from spool_core import bootstrap, listing
from spool_core.clock import from_epoch, rfc3339
from spool_core.jobs.model import JOB_TTL_SECONDS, Chunk
from spool_core.jobs.runner import Outcome
from spool_core.jobs.service import JobService
from spool_core.tenancy import Tenant
from tests.integration.test_jobs import job, runner_for
from tests.integration.test_keys_revocation import operator
from tests.support import ROOT, load_event


@pytest.fixture
def tenant(request: pytest.FixtureRequest, stack: StackDescription) -> Tenant:
    return Tenant("s-" + request.node.name[-40:].replace("[", "-").replace("]", "").replace("_", "-"))


@pytest.fixture
def service(tenant: Tenant) -> JobService:
    return bootstrap.job_service(tenant, public_url="https://api.example.com/prod")


@pytest.fixture
def variants(template: Template, stack: StackDescription) -> Iterator[Any]:
    """A streaming function (the event stream's, unless ``function_name`` says the OpenAI surface's)
    configured with some variables changed (its own containers)."""
    made: list[LocalFunction] = []

    def make(function_name: str = "EventsFunction", **environment: str) -> LocalFunction:
        spec = template.functions()[function_name]
        function = LocalFunction(
            spec,
            ROOT,
            region=stack.region,
            name=stack.resolver().ref(function_name),
            environment={**stack.environment_for(template, function_name), **environment},
        )
        made.append(function)
        return function

    yield make
    for function in made:
        function.shutdown()


def stream_event(
    job_id: str,
    tenant: Tenant | None,
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    scope: str = "*",
) -> dict[str, Any]:
    event = load_event("stream")
    event["path"] = f"/v1/jobs/{job_id}/events"
    event["pathParameters"] = {"job_id": job_id}
    event["headers"].pop("Last-Event-ID")
    event["multiValueHeaders"].pop("Last-Event-ID")
    for name, value in (headers or {}).items():
        event["headers"][name] = value
        event["multiValueHeaders"][name] = [value]
    event["queryStringParameters"] = query
    event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()} if query else None
    if tenant is None:
        del event["requestContext"]["authorizer"]
    else:
        event["requestContext"]["authorizer"].update({"tenant_id": tenant.id, "scope": scope})
    return event


def read(response: StreamedResponse) -> tuple[list[dict[str, Any]], str]:
    """The events of a whole response, and its raw text."""
    return read_text(b"".join(response.chunks()).decode())


def read_text(text: str) -> tuple[list[dict[str, Any]], str]:
    events = []
    for block in text.split("\n\n"):
        event: dict[str, Any] = {}
        for line in filter(None, block.split("\n")):
            name, _, value = line.partition(": ")
            if name == "data":
                event["data"] = json.loads(value)
            elif name in {"id", "event"}:
                event[name] = value
        if "event" in event:
            events.append(event)
    return events, text


def finished_job(service: JobService, tenant: Tenant, max_tokens: int = 400) -> str:
    created = service.create("k", job(max_tokens=max_tokens))
    assert runner_for(tenant).run(created.job.job_id) is Outcome.DONE
    return created.job.job_id


def test_the_sample_event_of_an_unknown_job_is_a_404_envelope_before_any_stream(
    functions: dict[str, LocalFunction],
) -> None:
    response = functions["EventsFunction"].open_stream(load_event("stream"))
    body = json.loads(b"".join(response.chunks()))
    assert response.status == 404
    assert body["error"]["code"] == "job_not_found"
    assert body["error"]["request_id"] == load_event("stream")["requestContext"]["requestId"]
    assert dict(response.headers)["x-request-id"] == body["error"]["request_id"]


def test_a_finished_job_streams_every_chunk_then_done_then_closes(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant)
    response = functions["EventsFunction"].open_stream(stream_event(job_id, tenant))
    assert response.status == 200
    assert dict(response.headers)["content-type"].startswith("text/event-stream")
    events, text = read(response)
    assert text.startswith("retry: 1000\n")
    chunks, done = events[:-1], events[-1]
    assert [int(e["id"]) for e in chunks] == list(range(1, len(chunks) + 1))
    stored = service.view(service.get(job_id))
    assert "".join(e["data"]["text"] for e in chunks) == stored["output"]
    assert (done["event"], done["id"]) == ("done", "done")
    assert done["data"] == {
        "job_id": job_id,
        "status": "completed",
        "usage": stored["usage"],
        "cost_usd": stored["cost_usd"],
        "error": None,
        "last_sequence_id": len(chunks),
    }


def test_last_event_id_resumes_after_it_and_wins_over_after(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant, max_tokens=1500)
    total = service.view(service.get(job_id))["progress"]["last_sequence_id"]
    assert total > 20
    event = stream_event(job_id, tenant, headers={"Last-Event-ID": "17"}, query={"after": "3"})
    events, _ = read(functions["EventsFunction"].open_stream(event))
    assert [int(e["id"]) for e in events if e["event"] == "chunk"] == list(range(18, total + 1))
    by_query, _ = read(
        functions["EventsFunction"].open_stream(stream_event(job_id, tenant, query={"after": "3"}))
    )
    assert next(int(e["id"]) for e in by_query if e["event"] == "chunk") == 4
    # An EventSource that received `done` and reconnects anyway is told to stop (204).
    finished = functions["EventsFunction"].open_stream(
        stream_event(job_id, tenant, headers={"Last-Event-ID": "done"})
    )
    assert finished.status == 204
    finished.close()


def test_a_bad_resume_point_is_a_400_naming_the_header(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant, max_tokens=50)
    response = functions["EventsFunction"].open_stream(
        stream_event(job_id, tenant, headers={"Last-Event-ID": "seventeen"})
    )
    body = json.loads(b"".join(response.chunks()))
    assert (response.status, body["error"]["code"]) == (400, "invalid_request")
    assert body["error"]["details"]["fields"][0]["field"] == "Last-Event-ID"


def test_a_resume_point_sent_twice_is_a_400_as_the_chunks_route_answers(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant, max_tokens=50)
    event = stream_event(job_id, tenant, query={"after": "2"})
    event["multiValueQueryStringParameters"] = {"after": ["1", "2"]}  # ?after=1&after=2
    response = functions["EventsFunction"].open_stream(event)
    body = json.loads(b"".join(response.chunks()))
    assert (response.status, body["error"]["details"]["param"]) == (400, "after")


def test_other_tenants_and_other_jobs_tokens_see_nothing(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant, max_tokens=50)
    cases = [
        (stream_event(job_id, Tenant("someone-else")), 404),
        (stream_event(job_id, tenant, scope="events:job_other"), 404),  # a token for another job
        (stream_event(job_id, None), 401),  # no authorizer context: a deployment error, not a leak
    ]
    for event, status in cases:
        response = functions["EventsFunction"].open_stream(event)
        body = json.loads(b"".join(response.chunks()))
        assert response.status == status, body
        assert body["error"]["suggestions"] or body["error"]["code"] == "unauthorized"
    scoped = functions["EventsFunction"].open_stream(stream_event(job_id, tenant, scope=f"events:{job_id}"))
    assert scoped.status == 200
    scoped.close()


def test_a_stream_at_its_time_limit_ends_cleanly_and_the_client_resumes(
    variants: Any, service: JobService, tenant: Tenant
) -> None:
    function = variants(SPOOL_STREAM_MAX_SECONDS="1", SPOOL_STREAM_PING_SECONDS="0.2")
    created = service.create("k", job(max_tokens=300))  # queued: nobody runs it yet
    job_id = created.job.job_id
    events, text = read(function.open_stream(stream_event(job_id, tenant)))  # returns: it ended by itself
    assert events == [] and ": ping\n\n" in text  # ended without `done`, pinging while idle
    assert runner_for(tenant).run(job_id) is Outcome.DONE
    resumed, _ = read(function.open_stream(stream_event(job_id, tenant, headers={"Last-Event-ID": "0"})))
    assert resumed[-1]["event"] == "done"
    assert "".join(e["data"]["text"] for e in resumed[:-1]) == service.view(service.get(job_id))["output"]


def test_cors_names_an_allowed_origin_and_exposes_the_headers_clients_read(
    variants: Any, service: JobService, tenant: Tenant
) -> None:
    job_id = finished_job(service, tenant, max_tokens=50)
    function = variants(SPOOL_CORS_ORIGINS="https://app.example.com,https://admin.example.com")
    allowed = function.open_stream(
        stream_event(job_id, tenant, headers={"Origin": "https://admin.example.com"})
    )
    headers = dict(allowed.headers)
    allowed.close()
    assert headers["access-control-allow-origin"] == "https://admin.example.com"
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert {"X-Request-Id", "Retry-After", "X-RateLimit-Remaining-Tokens"} <= exposed
    other = function.open_stream(stream_event(job_id, tenant, headers={"Origin": "https://evil.example"}))
    assert "access-control-allow-origin" not in dict(other.headers)
    other.close()


# ---------------------------------------------------------------------------------------- authorizer
def authorizer_event(path: str, *, token: str | None = None, key: str | None = None) -> dict[str, Any]:
    event = load_event("authorizer")
    method_arn = event["methodArn"].rsplit("/GET/", 1)[0]
    event["methodArn"] = f"{method_arn}/GET{path}"
    event["path"] = path
    del event["headers"]["Authorization"]
    del event["multiValueHeaders"]["Authorization"]
    if key:
        event["headers"]["Authorization"] = f"Bearer {key}"
    if token is not None:
        event["queryStringParameters"] = {"token": token}
        event["multiValueQueryStringParameters"] = {"token": [token]}
    return event


def test_an_events_token_opens_exactly_its_jobs_stream(invoke: Any, stack: StackDescription) -> None:
    signer = bootstrap.events_token()
    assert signer is not None
    token = signer.sign("tenant-a", "job_1", int(time.time()) + 3600)
    policy = invoke("AuthorizerFunction", authorizer_event("/v1/jobs/job_1/events", token=token))
    (statement,) = policy["policyDocument"]["Statement"]
    assert statement["Effect"] == "Allow"
    assert [r.rsplit("/prod/", 1)[1] for r in statement["Resource"]] == ["GET/v1/jobs/job_1/events"]
    assert policy["context"] == {"tenant_id": "tenant-a", "scope": "events:job_1"}


@pytest.mark.parametrize(
    "make_token",
    [
        lambda signer: signer.sign("tenant-a", "job_1", int(time.time()) - 1),  # expired
        lambda signer: signer.sign("tenant-a", "job_1", int(time.time()) + 60)[:-3] + "abc",  # forged
        lambda signer: "not-a-token",
    ],
)
def test_expired_forged_and_malformed_tokens_are_denied(invoke: Any, make_token: Any) -> None:
    token = make_token(bootstrap.events_token())
    policy = invoke("AuthorizerFunction", authorizer_event("/v1/jobs/job_1/events", token=token))
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Deny"


def test_an_api_key_wins_over_a_token(invoke: Any) -> None:
    from tests.integration.conftest import DEV_KEY, DEV_TENANT

    event = authorizer_event("/v1/contexts", token="not-a-token", key=DEV_KEY)
    policy = invoke("AuthorizerFunction", event)
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    assert policy["context"]["tenant_id"] == DEV_TENANT and policy["context"]["scope"] == "*"


def test_links_events_carries_a_token_for_that_job_that_outlives_the_log(
    service: JobService, tenant: Tenant
) -> None:
    created = service.create("k", job(max_tokens=10))
    link = service.view(created.job)["links"]["events"]
    prefix = f"https://api.example.com/prod/v1/jobs/{created.job.job_id}/events?token="
    assert link.startswith(prefix)
    token = link.removeprefix(prefix)
    signer = bootstrap.events_token()
    assert signer is not None
    assert signer.verify(token, time.time()) == (tenant.id, created.job.job_id, None)  # no caller's key here
    assert signer.verify(token, time.time() + JOB_TTL_SECONDS) is not None  # as long as the log
    assert "sk-" not in link


def test_an_events_token_opens_no_openai_route(functions: dict[str, LocalFunction], tenant: Tenant) -> None:
    event = stream_event("job_x", tenant, scope="events:job_x")
    event["path"] = event["requestContext"]["path"] = "/v1/responses/resp_x"
    response = functions["StreamFunction"].open_stream(event)
    body = json.loads(b"".join(response.chunks()))
    assert (response.status, body["error"]["code"]) == (401, "unauthorized")
    assert body["error"]["type"] == "authentication_error"  # the OpenAI routes' error shape


def chat_event(tenant: Tenant, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``POST /v1/chat/completions`` with ``body``, as the gateway hands it to the OpenAI surface."""
    event = stream_event("job_x", tenant, headers=headers)
    event.update(
        resource="/v1/chat/completions",
        path="/v1/chat/completions",
        httpMethod="POST",
        pathParameters=None,
        body=json.dumps(body),
    )
    event["requestContext"].update(path="/v1/chat/completions", httpMethod="POST")
    event["headers"]["Content-Type"] = "application/json"
    event["multiValueHeaders"]["Content-Type"] = ["application/json"]
    return event


def responses_event(tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/responses`` with ``body``, as the gateway hands it to the OpenAI surface."""
    event = chat_event(tenant, body)
    event["path"] = event["resource"] = event["requestContext"]["path"] = "/v1/responses"
    return event


def made_job(service: JobService) -> str:
    """The job an OpenAI request in flight made (it is the tenant's only one), once it exists."""
    codec = listing.cursor_codec(bootstrap.settings())
    deadline = time.monotonic() + 60
    while not (queued := service.list_jobs(codec).data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued, "the request made no job"
    return str(queued[0]["job_id"])


def answered(response: StreamedResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = json.loads(b"".join(response.chunks()))
    response.close()
    return response.status, {k.lower(): v for k, v in response.headers}, body


CHAT = {"model": "sim-fast", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


def test_a_chat_answer_out_of_time_names_its_job_and_tells_sdks_not_to_retry(
    variants: Any, service: JobService, tenant: Tenant
) -> None:
    """An SDK retries a 504 by itself (twice by default), and with no Idempotency-Key each retry was a
    new job, generated and paid again (three for one call, the first two unnamed)."""
    function = variants("StreamFunction", SPOOL_ANSWER_MAX_SECONDS="1")
    status, headers, body = answered(function.open_stream(chat_event(tenant, CHAT)))  # nobody runs it
    job_id = body["error"]["details"]["job_id"]
    assert (status, body["error"]["code"]) == (504, "timeout")
    assert headers["x-should-retry"] == "false" and headers["x-spool-job-id"] == job_id
    assert service.get(job_id).status == "queued"  # it goes on
    assert any(f"/v1/jobs/{job_id}" in s for s in body["error"]["suggestions"])


def test_a_cancelled_job_behind_a_chat_answer_is_an_error_not_a_complete_answer(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant
) -> None:
    """Cancelled from elsewhere (``POST /v1/jobs/{id}/cancel``) while a non-streamed chat awaits it,
    the answer was a 200 with ``finish_reason: "stop"``: cut short, and looking complete."""
    outcome: list[tuple[int, dict[str, str], dict[str, Any]]] = []
    waiting = threading.Thread(
        target=lambda: outcome.append(
            answered(functions["StreamFunction"].open_stream(chat_event(tenant, CHAT)))
        )
    )
    waiting.start()
    job_id = made_job(service)
    service.cancel(job_id)
    waiting.join(timeout=120)
    status, headers, body = outcome[0]
    assert (status, body["error"]["code"]) == (409, "job_cancelled")
    assert headers["x-should-retry"] == "false" and headers["x-spool-job-id"] == job_id
    assert body["error"]["details"] == {"job_id": job_id, "output_tokens": 0}


@pytest.mark.parametrize("route", ["events", "chat"])
def test_a_stream_ends_once_the_key_it_was_opened_with_is_revoked(
    variants: Any, service: JobService, tenant: Tenant, route: str
) -> None:
    """A stream can hold its function for the whole of a long job; it used to run to the job's end
    after its key was revoked, where a WebSocket opened with that key was closed. Now it asks through
    the key cache (off here) every few seconds: the native stream ends without ``done``, with an
    ``error`` event saying why (the client's reconnect is refused, 401), an OpenAI stream with an
    error SDKs raise. The job goes on."""
    keys = operator()
    key, record = keys.create(tenant, "to revoke")
    other, _ = keys.create(tenant, "kept")
    # The key the authorizer checked is the one its context names; a second key header (which the
    # authorizer did not read) must not decide the stream's fate.
    headers = {"Authorization": f"Bearer {key}", "x-api-key": other}
    settings = {"SPOOL_AUTH_CACHE_SECONDS": "0", "SPOOL_STREAM_PING_SECONDS": "0.2"}
    if route == "events":
        job_id = service.create("k", job(max_tokens=300)).job.job_id  # queued: nobody runs it
        event, function = stream_event(job_id, tenant, headers=headers), variants(**settings)
    else:
        body = {**CHAT, "stream": True}  # its job stays queued too: the stream waits, pinging
        event, function = chat_event(tenant, body, headers), variants("StreamFunction", **settings)
    event["requestContext"]["authorizer"]["key_hash"] = record.key_hash  # as the authorizer passes it
    response = function.open_stream(event)
    assert response.status == 200
    chunks = response.chunks()
    received = [next(chunks)]  # the stream is open
    keys.revoke(record.key_id)
    ended = threading.Event()

    def rest() -> None:
        received.extend(chunks)
        ended.set()

    threading.Thread(target=rest, daemon=True).start()
    assert ended.wait(60), "the stream went on after its key was revoked"
    text = b"".join(received).decode()
    if route == "events":
        events, _ = read_text(text)
        (revoked,) = events  # no `done` (the job goes on): why the stream ends, in Spool's envelope
        assert revoked["event"] == "error" and "id" not in revoked
        error = revoked["data"]["error"]
        assert error["code"] == "unauthorized" and error["details"]["job_id"] == job_id
        assert error["request_id"] == event["requestContext"]["requestId"]
        assert service.get(job_id).status == "queued"
        return
    datas = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    error = datas[-1]["error"]
    assert (error["code"], error["type"]) == ("unauthorized", "authentication_error")
    assert "revoked" in error["message"] and f"/v1/jobs/{error['job_id']}/events" in error["suggestions"][0]
    assert service.get(error["job_id"]).status == "queued"


def test_a_response_out_of_time_is_a_timeout_that_names_the_response_not_a_cut_off_answer(
    variants: Any, service: JobService, tenant: Tenant
) -> None:
    """A non-background ``POST /v1/responses`` that waits out its time was a 200 ``in_progress`` holding
    the part written so far, which an SDK's ``output_text`` hands over as the answer. It is a 504, as a
    chat answer out of time is, naming the response to read."""
    function = variants("StreamFunction", SPOOL_ANSWER_MAX_SECONDS="3")
    outcome: list[tuple[int, dict[str, str], dict[str, Any]]] = []
    body = {"model": "sim-fast", "input": "hi", "max_output_tokens": 50}
    event = responses_event(tenant, body)
    waiting = threading.Thread(target=lambda: outcome.append(answered(function.open_stream(event))))
    waiting.start()
    job_id = made_job(service)
    jobs, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    now = int(time.time() * 1000)
    jobs.take_lease(job_id, "lease-1", now, now + 60_000)  # the worker takes it and writes a chunk
    written = rfc3339(from_epoch(now / 1000))
    chunks.append(job_id, Chunk(sequence_id=1, text="Half an", tokens=2, tokens_total=2, created_at=written))
    waiting.join(timeout=120)
    status, headers, answer = outcome[0]
    response_id = "resp_" + job_id.removeprefix("job_")
    assert (status, answer["error"]["code"]) == (504, "timeout")
    assert answer["error"]["details"] == {"job_id": job_id, "response_id": response_id}
    assert headers["x-should-retry"] == "false" and headers["x-spool-job-id"] == job_id
    assert f"GET /v1/responses/{response_id}" in answer["error"]["suggestions"][0]
    assert "Half an" not in json.dumps(answer)
    assert service.get(job_id).status == "running"  # it goes on


def test_a_responses_refusal_names_max_output_tokens_not_the_jobs_max_tokens(
    functions: dict[str, LocalFunction], tenant: Tenant
) -> None:
    event = responses_event(tenant, {"model": "sim-fast", "input": "hi", "max_output_tokens": 100_000})
    status, _, body = answered(functions["StreamFunction"].open_stream(event))
    error = body["error"]
    assert (status, error["code"], error["param"]) == (400, "invalid_request", "max_output_tokens")
    assert "max_output_tokens 100,000 exceeds" in error["message"] and "max_tokens" not in error["message"]
    assert all("max_tokens" not in s for s in error["suggestions"])
    assert error["details"]["max_output_tokens"] == 100_000 and "max_tokens" not in error["details"]
    chat = chat_event(tenant, {**CHAT, "max_tokens": 100_000})  # the chat surface's own name stays
    _, _, refused = answered(functions["StreamFunction"].open_stream(chat))
    assert (refused["error"]["param"], refused["error"]["message"].split()[0]) == ("max_tokens", "max_tokens")
    only_newer = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    newer = chat_event(tenant, {**only_newer, "max_completion_tokens": 100_000})  # as the request named it
    _, _, refused = answered(functions["StreamFunction"].open_stream(newer))
    error = refused["error"]
    assert (error["param"], error["message"].split()[0]) == ("max_completion_tokens", "max_completion_tokens")
    assert all("max_tokens" not in s for s in error["suggestions"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("", 404, "not_found"),
        ("{}", 404, "not_found"),
        ("{bad", 400, "invalid_request"),
        ('{"reason": "x"}', 400, "invalid_request"),
    ],
    ids=["none", "empty", "malformed", "a-field"],
)
def test_a_cancel_takes_no_body_and_a_malformed_one_is_named(
    functions: dict[str, LocalFunction], tenant: Tenant, body: str, status: int, code: str
) -> None:
    """A cancel answered 200 to `{bad` and to fields it does not take; a malformed chat body named no
    field. (An unknown response id: the cancel that takes its body answers 404.)"""
    event = chat_event(tenant, {})
    event["path"] = event["resource"] = event["requestContext"]["path"] = "/v1/responses/resp_x/cancel"
    event["body"] = body
    answer = json.loads(b"".join(functions["StreamFunction"].open_stream(event).chunks()))
    assert answer["error"]["code"] == code
    if status == 400:
        assert answer["error"]["details"]["fields"][0]["field"] in {"body", "body.reason"}
    chat = chat_event(tenant, {})
    chat["body"] = "{bad"
    malformed = json.loads(b"".join(functions["StreamFunction"].open_stream(chat).chunks()))
    assert malformed["error"]["details"]["fields"] == [
        {"field": "body", "message": malformed["error"]["message"], "type": "json_invalid"}
    ]


def test_a_cancel_sent_many_fields_names_at_most_twenty_as_the_other_functions_do(
    functions: dict[str, LocalFunction], tenant: Tenant
) -> None:
    """The streaming function's no-body rule and caps are the other functions' (one rule): a long
    name is cut, twenty are named and the rest counted."""
    event = chat_event(tenant, {})
    event["path"] = event["resource"] = event["requestContext"]["path"] = "/v1/responses/resp_x/cancel"
    event["body"] = json.dumps({"x" * 100_000: 1} | {f"k{i}": 1 for i in range(5000)})
    raw = b"".join(functions["StreamFunction"].open_stream(event).chunks())
    error = json.loads(raw)["error"]
    assert error["code"] == "invalid_request" and len(raw) < 10_000
    fields = error["details"]["fields"]
    assert len(fields) == 20 and error["details"]["more_fields"] == 4981
    assert fields[0]["field"] == ("body." + "x" * 100_000)[:200] and fields[1]["field"] == "body.k0"
    assert error["message"].endswith("and 4,981 more")


@pytest.mark.parametrize(
    ("value", "streams"), [("banana", None), ("TRUE", True), ("yes", True), ("0", False), ("", False)]
)
def test_a_responses_stream_flag_is_read_as_a_boolean_and_anything_else_is_named(
    functions: dict[str, LocalFunction], service: JobService, tenant: Tenant, value: str, streams: bool | None
) -> None:
    """``GET /v1/responses/{id}?stream=banana`` answered the JSON resource, as if the caller had asked
    for it, and ``stream=TRUE`` did too: the flag is read as the REST routes read one."""
    from spool_core.openai_compat import responses

    job_id = finished_job(service, tenant, max_tokens=20)
    path = f"/v1/responses/{responses.response_id(job_id)}"
    event = stream_event(job_id, tenant, query={"stream": value})
    event.update(resource="/v1/responses/{response_id}", path=path, pathParameters=None)
    event["requestContext"]["path"] = path
    response = functions["StreamFunction"].open_stream(event)
    raw = b"".join(response.chunks())
    headers = {k.lower(): v for k, v in response.headers}
    if streams is None:
        error = json.loads(raw)["error"]
        assert (response.status, error["code"], error["details"]["param"]) == (
            400,
            "invalid_request",
            "stream",
        )
        assert error["details"]["fields"] == [{"field": "query.stream", "message": "must be true or false"}]
    elif streams:
        assert response.status == 200 and headers["content-type"].startswith("text/event-stream")
        assert b"response.completed" in raw
    else:
        assert response.status == 200 and json.loads(raw)["status"] == "completed"
