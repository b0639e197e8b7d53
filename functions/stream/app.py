"""The streaming function: the OpenAI-compatible surface (``POST /v1/chat/completions`` and the
Responses API, ``/v1/responses...``), each request a Spool job, its answer streamed as it is produced
or returned whole. A job's native Server-Sent Events are ``events.py``'s (``EventsFunction``).

Python's managed Lambda runtime cannot stream a response, so this is a small ASGI app (Starlette)
that AWS Lambda Web Adapter runs inside the function (``run.sh``, ``AWS_LWA_INVOKE_MODE=
response_stream``) behind API Gateway's response streaming; the local stack runs the same app the
way the adapter does, outside Lambda. Routes stay thin: the logic is in ``spool_core.events`` and
``spool_core.openai_compat``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spool_core import bootstrap, snapshot
from spool_core.api import web
from spool_core.errors import InvalidRequest, SpoolError
from spool_core.events import (
    Ended,
    StreamSettings,
    await_end,
    follow,
    parse_cursor,
)
from spool_core.jobs.errors import JobNotFound, RequestInProgress
from spool_core.jobs.model import Job
from spool_core.jobs.service import JobService
from spool_core.openai_compat import chat, responses, retries
from spool_core.openai_compat.common import JobCancelled, JobFailed, StillRunning, in_request_terms
from spool_core.openai_compat.params import ChatPolicy, ResponsesPolicy, parse

# What the first request loads (creating a job): before a snapshot, not on each new container's first
# request (see spool_core.snapshot).
snapshot.load_before_snapshot(*snapshot.JOB_CREATION_MODULES)

CANCEL_WAIT = StreamSettings(max_seconds=10)  # a cancel answers once the worker has stopped (one flush)


def _settings() -> StreamSettings:
    return StreamSettings.of(bootstrap.settings())


def _service(request: Request) -> JobService:
    who = web.caller(request)
    who.require_key()
    return bootstrap.job_service(who.tenant)


def _access(request: Request) -> Callable[[], bool] | None:
    """Whether the request's key is still active: a stream ends once it is revoked."""
    return web.caller(request).access(bootstrap.api_keys())


def _job_headers(request: Request, job: Job, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Request-Id": web.request_id(request), "X-Spool-Job-Id": job.job_id, **(extra or {})}


# ---------------------------------------------------------------------------------------- OpenAI
async def _create(
    request: Request,
    service: JobService,
    body: chat.ChatRequest | responses.ResponsesRequest,
    *,
    awaited: bool,
) -> tuple[Job, dict[str, str]]:
    """A job for an OpenAI request: its ``Idempotency-Key`` when sent; when an SDK retries a request
    sent without one, the key that request was given (``retries``); a fresh one otherwise, remembered
    for those retries when the whole answer is ``awaited``. A retry with the same key gets the same
    job, finished or still running (it is then streamed or awaited from the start): the same answer,
    generated and paid once. Refusals name the job's ``max_tokens`` as the request did."""
    keys = bootstrap.retry_keys(web.caller(request).tenant)
    digest = retries.digest(request.url.path, await request.body())
    now_s = int(time.time())
    sent, count = request.headers.get("idempotency-key"), request.headers.get(retries.RETRY_COUNT_HEADER)
    key, new = await run_in_threadpool(retries.key_for, sent, count, digest, keys, now_s)
    job_request = body.job_request()
    try:
        created = await run_in_threadpool(
            lambda: service.create(key, job_request, surface=body.SURFACE, echo=body.echo())
        )
    except RequestInProgress as running:
        job = await run_in_threadpool(service.get, running.details["job_id"])
        return job, {}
    except SpoolError as refused:
        raise in_request_terms(refused, body.max_tokens_name) from None
    if new and awaited:  # once the job exists: a refused request stores nothing, and has no job to fold into
        await run_in_threadpool(retries.remember, keys, digest, key, now_s)
    return created.job, created.headers


async def chat_completions(request: Request) -> Response:
    body = parse(chat.ChatRequest, await web.json_body(request), ChatPolicy)
    service = _service(request)
    job, limits = await _create(request, service, body, awaited=not body.stream)
    headers = _job_headers(request, job, limits)
    if body.stream:
        followed = follow(
            service, job.job_id, 0, _settings(), budget=job.request.max_tokens, allowed=_access(request)
        )
        chunks = chat.completion_chunks(job, followed, body.include_usage, web.request_id(request))
        return web.sse(chunks, headers)
    ended = await web.last(await_end(service, job.job_id, _settings()))
    if not isinstance(ended, Ended):
        raise StillRunning(job.job_id)
    if ended.job.status == "failed":
        raise JobFailed(ended.job)
    if ended.job.status == "cancelled":
        raise JobCancelled(ended.job)
    output = await run_in_threadpool(lambda: service.view(ended.job)["output"])
    return web.json_response(chat.completion(ended.job, output), headers)


async def create_response(request: Request) -> Response:
    body = parse(responses.ResponsesRequest, await web.json_body(request), ResponsesPolicy)
    service = _service(request)
    job, limits = await _create(request, service, body, awaited=not (body.stream or body.background))
    headers = _job_headers(request, job, limits)
    if body.stream:
        return await _response_stream(request, service, job, None, headers)
    if not body.background:
        ended = await web.last(await_end(service, job.job_id, _settings()))
        if not isinstance(ended, Ended):  # as a chat answer: never a cut-off text in a 200
            raise StillRunning(job.job_id, response_id=responses.response_id(job.job_id))
        job = ended.job
    return await _response_json(service, job, headers)


async def _response_job(request: Request, read: Callable[[str], Job]) -> Job:
    """The job behind the path's response id, read (or cancelled) by ``read``; a 404 names the
    response the caller asked for, not the job behind it."""
    response_id = request.path_params["response_id"]
    try:
        return await run_in_threadpool(read, responses.job_id_of(response_id))
    except JobNotFound:
        raise responses.not_found(response_id) from None


async def get_response(request: Request) -> Response:
    service = _service(request)
    job = await _response_job(request, service.get)
    headers = _job_headers(request, job)
    if web.query_flag(request, "stream"):
        return await _response_stream(request, service, job, _starting_after(request), headers)
    return await _response_json(service, job, headers)


async def cancel_response(request: Request) -> Response:
    await web.no_body(request)
    service = _service(request)
    job = await _response_job(request, service.cancel)
    ended = await web.last(await_end(service, job.job_id, CANCEL_WAIT))
    if isinstance(ended, Ended):
        job = ended.job
    return await _response_json(service, job, _job_headers(request, job))


def _starting_after(request: Request) -> int | None:
    raw = web.query(request, "starting_after")
    if raw in (None, ""):
        return None
    assert raw is not None
    cursor = parse_cursor(raw)
    if cursor is None:
        raise InvalidRequest(
            "starting_after must be the sequence_number of the last event received",
            details={"param": "starting_after", "value": raw[:40]},
        )
    return cursor


async def _response_stream(
    request: Request, service: JobService, job: Job, starting_after: int | None, headers: dict[str, str]
) -> Response:
    followed = follow(
        service,
        job.job_id,
        responses.first_chunk_after(starting_after),
        _settings(),
        budget=job.request.max_tokens,
        allowed=_access(request),
    )
    instructions = await run_in_threadpool(responses.instructions_of, job, service.messages)
    events = responses.response_events(
        job, followed, starting_after, lambda j: service.view(j)["output"], instructions
    )
    return web.sse(events, headers)


async def _response_json(service: JobService, job: Job, headers: dict[str, str]) -> Response:
    output = await run_in_threadpool(lambda: service.view(job)["output"])
    instructions = await run_in_threadpool(responses.instructions_of, job, service.messages)
    return web.json_response(responses.response_object(job, output, instructions), headers)


async def ready(request: Request) -> Response:
    """The adapter's readiness check."""
    return Response("ok", media_type="text/plain")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
        Route("/healthz", ready),
    ],
    exception_handlers=web.EXCEPTION_HANDLERS,
    middleware=web.middleware(),
)
