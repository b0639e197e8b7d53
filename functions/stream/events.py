"""``GET /v1/jobs/{job_id}/events``: a job's chunk log as Server-Sent Events (``EventsFunction``).

The streaming function's neighbour: the same kind of ASGI app, run the same way by AWS Lambda Web
Adapter (``events.sh``), serving readers only. It loads the log's reader
(``spool_core.jobs.pages``), not the job service with its admission, contexts, limits and models: a
stream holds its function for the whole answer, so every stream's cold start pays only for reading.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spool_core import bootstrap, snapshot
from spool_core.api import web
from spool_core.events import StreamSettings, job_events, resume_point
from spool_core.jobs.errors import JobNotFound

# What the first stream loads (the log's reader and its stores): before a snapshot (see
# spool_core.snapshot).
snapshot.load_before_snapshot("spool_core.jobs.pages", "spool_core.adapters.jobs")


async def job_stream(request: Request) -> Response:
    """The job's events after the client's resume point (``Last-Event-ID`` or ``after``), then ``done``."""
    who = web.caller(request)
    job_id = request.path_params["job_id"]
    if who.scope not in {"*", f"events:{job_id}"}:  # a token opens its own job's stream, no other
        raise JobNotFound(f"Job '{job_id}' not found", details={"job_id": job_id})
    resume = resume_point(request.headers.get("last-event-id"), web.query(request, "after"))
    headers = {"X-Request-Id": who.request_id}
    if resume is None:  # the client received `done` already: 204 tells an EventSource to stop
        return Response(status_code=204, headers=headers)
    pages = bootstrap.chunk_pages(who.tenant)
    job = await run_in_threadpool(pages.get, job_id)  # 404 before the stream starts, in the envelope
    settings = StreamSettings.of(bootstrap.settings())
    events = job_events(
        pages,
        job_id,
        resume,
        settings,
        budget=job.request.max_tokens,
        allowed=who.access(bootstrap.api_keys()),  # the stream ends once its key is revoked
        request_id=who.request_id,
    )
    return web.sse(events, headers)


async def ready(request: Request) -> Response:
    """The adapter's readiness check."""
    return Response("ok", media_type="text/plain")


app = Starlette(
    routes=[Route("/v1/jobs/{job_id}/events", job_stream, methods=["GET"]), Route("/healthz", ready)],
    exception_handlers=web.EXCEPTION_HANDLERS,
    middleware=web.middleware(),
)
