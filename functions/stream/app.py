"""The streaming function: responses that flow as they are produced (Server-Sent Events).

Python's managed Lambda runtime cannot stream a response, so this is a small ASGI app (Starlette)
that AWS Lambda Web Adapter runs inside the function (``run.sh``, ``AWS_LWA_INVOKE_MODE=
response_stream``) behind API Gateway's response streaming; the local stack runs the same app the
way the adapter does, outside Lambda. The caller was authenticated at the edge: the authorizer's
context arrives in ``x-amzn-request-context`` (set by the adapter from the invocation, never taken
from the client).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spool_core import bootstrap
from spool_core.api import cors
from spool_core.api.errors import envelope, status_for
from spool_core.errors import InternalError, MethodNotAllowed, NotFound, SpoolError, Unauthorized
from spool_core.events import StreamSettings, Wait, job_events, resume_point
from spool_core.jobs.errors import JobNotFound
from spool_core.observability import logger
from spool_core.tenancy import InvalidTenantId, Tenant

REQUEST_CONTEXT_HEADER = "x-amzn-request-context"  # LWA overwrites any copy the client sent


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    scope: str  # "*" for an API key, "events:<job_id>" for a links.events token
    request_id: str


def _request_context(request: Request) -> dict[str, Any]:
    try:
        context = json.loads(request.headers.get(REQUEST_CONTEXT_HEADER) or "{}")
    except ValueError:
        return {}
    return context if isinstance(context, dict) else {}


def _request_id(request: Request) -> str:
    """API Gateway's request id (the one in X-Request-Id and in the logs), once per request."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = str(_request_context(request).get("requestId") or uuid.uuid4())
    return str(request.state.request_id)


def caller(request: Request) -> Caller:
    context = _request_context(request)
    authorizer = context.get("authorizer") or {}
    request_id = _request_id(request)
    try:
        tenant = Tenant(str(authorizer["tenant_id"]))
    except (KeyError, InvalidTenantId):
        raise Unauthorized("The request carries no authenticated tenant") from None
    return Caller(tenant, str(authorizer.get("scope") or "*"), request_id)


async def job_stream(request: Request) -> Response:
    """``GET /v1/jobs/{job_id}/events``: the job's chunk log as Server-Sent Events."""
    who = caller(request)
    job_id = request.path_params["job_id"]
    if who.scope not in {"*", f"events:{job_id}"}:  # a token opens its own job's stream, no other
        raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
    resume = resume_point(request.headers.get("last-event-id"), request.query_params.get("after"))
    headers = {"X-Request-Id": who.request_id}
    if resume is None:  # the client received `done` already: 204 tells an EventSource to stop
        return Response(status_code=204, headers=headers)
    service = bootstrap.job_service(who.tenant)
    await run_in_threadpool(service.get, job_id)  # 404 before the stream starts, in the envelope
    config = bootstrap.settings()
    settings = StreamSettings(max_seconds=config.stream_max_seconds, ping_seconds=config.stream_ping_seconds)
    return StreamingResponse(
        _drive(job_events(service, job_id, resume, settings)),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _drive(events: Iterator[str | Wait]) -> AsyncIterator[str]:
    """Run the stream's reads (blocking DynamoDB calls) on worker threads and its waits on the event
    loop, so an idle stream holds no thread and many streams share one process."""
    while True:
        item = await run_in_threadpool(next, events, None)
        if item is None:
            return
        if isinstance(item, Wait):
            await asyncio.sleep(item.seconds)
        else:
            yield item


async def ready(request: Request) -> Response:
    """The adapter's readiness check."""
    return Response("ok", media_type="text/plain")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in Spool's envelope (with ``Allow`` on a 405)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "GET")
        error: SpoolError = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}",
            details={"method": request.method, "path": request.url.path, "allowed": allowed.split(", ")},
            suggestions=[f"Use one of: {allowed}"],
        )
        error.headers = {"Allow": allowed}
    else:
        error = NotFound(
            f"No route for {request.method} {request.url.path}", details={"path": request.url.path}
        )
    return await domain_error(request, error)


async def domain_error(request: Request, exc: Exception) -> Response:
    error = exc if isinstance(exc, SpoolError) else InternalError("Internal error while handling the request")
    if status_for(error) >= 500:
        logger.exception("request failed", extra={"code": error.code})
    request_id = _request_id(request)
    return JSONResponse(
        envelope(error, request_id),
        status_code=status_for(error),
        headers={**error.headers, "X-Request-Id": request_id},
    )


app = Starlette(
    routes=[Route("/v1/jobs/{job_id}/events", job_stream, methods=["GET"]), Route("/healthz", ready)],
    exception_handlers={SpoolError: domain_error, HTTPException: http_error, Exception: domain_error},
    middleware=[
        Middleware(
            CORSMiddleware,
            allow_origins=cors.allowed_origins(),
            allow_methods=list(cors.ALLOWED_METHODS),
            allow_headers=list(cors.ALLOWED_HEADERS),
            expose_headers=list(cors.EXPOSED_HEADERS),
            max_age=cors.MAX_AGE_SECONDS,
        )
    ],
)
