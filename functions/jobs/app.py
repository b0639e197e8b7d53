"""/v1/jobs: create generation jobs idempotently, read their chunk log, resume, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import BaseModel, ConfigDict, Field

from spool_core import bootstrap, listing, snapshot
from spool_core.api.resolver import (
    api_handler,
    create_resolver,
    json_response,
    parse_body,
    public_base_url,
    tenant_of,
)
from spool_core.jobs.model import MAX_SEQUENCE_ID, JobRequest
from spool_core.jobs.service import (
    DEFAULT_CHUNK_LIMIT,
    MAX_CHUNK_LIMIT,
    MAX_WAIT_SECONDS,
    STATUSES,
    JobService,
    check_idempotency_key,
)

app = create_resolver()
# What creating the first job loads (the stores, the queue, flags, the secret's provider): before a
# snapshot, not on each new container's first request (see spool_core.snapshot).
snapshot.load_before_snapshot(
    "spool_core.adapters.jobs",
    "spool_core.adapters.contexts",
    "spool_core.adapters.listing",
    "spool_core.adapters.usage",
    "spool_core.events",
    "spool_core.flags",
    "aws_lambda_powertools.utilities.parameters",
    "aws_lambda_powertools.utilities.feature_flags",
    "tiktoken",
)


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    last_sequence_id: int = Field(default=0, ge=0, le=MAX_SEQUENCE_ID)
    limit: int = Field(default=DEFAULT_CHUNK_LIMIT, ge=1, le=MAX_CHUNK_LIMIT)
    wait: float = Field(default=0, ge=0, le=MAX_WAIT_SECONDS)


def _service() -> JobService:
    return bootstrap.job_service(tenant_of(app), public_url=public_base_url(app))


def _reader() -> JobService:
    """The service for chunk pages (ChunksFunction): no job resource, so no links.events to sign."""
    return bootstrap.job_service(tenant_of(app))


@app.post("/v1/jobs")
def create_job() -> Response[str]:
    service = _service()
    key = check_idempotency_key(app.current_event.headers.get("Idempotency-Key"))
    created = service.create(key, parse_body(app, JobRequest))
    body = service.view(created.job)
    if created.replayed:
        return json_response(200, body, created.headers)
    return json_response(202, body, {"Location": f"/v1/jobs/{created.job.job_id}", **created.headers})


@app.get("/v1/jobs", summary="The tenant's jobs, newest first, without their output")
def list_jobs(
    status: Annotated[
        str | None, Query(description=f"only jobs of this status: {'|'.join(STATUSES)}")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)] = listing.DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> Response[str]:
    service = _service()
    page = service.list_jobs(
        listing.cursor_codec(bootstrap.settings()), status=status, limit=limit, cursor=cursor
    )
    return json_response(200, page.body(), service.rate_limit_headers())


@app.get("/v1/jobs/<job_id>")
def get_job(
    job_id: str,
    output: Annotated[bool, Query(description="false: the job without its output, for status polls")] = True,
) -> Response[str]:
    service = _service()
    view = service.view(service.get(job_id), with_output=output)
    return json_response(200, view, service.rate_limit_headers())


@app.get("/v1/jobs/<job_id>/chunks", summary="A page of the job's chunk log (long-poll with wait)")
def get_chunks(
    job_id: str,
    after: Annotated[int, Query(ge=0, le=MAX_SEQUENCE_ID, description="the last sequence_id held")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_CHUNK_LIMIT)] = DEFAULT_CHUNK_LIMIT,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="seconds to wait for a chunk")] = 0,
) -> Response[str]:
    # A chunk page carries no X-RateLimit-* headers (DESIGN.md gives them to POST /v1/jobs' 202, 200
    # and 429): a long-polling reader asks for one page per chunk, and each would cost a read of the
    # tenant's usage items.
    page: dict[str, Any] = _reader().chunks(job_id, after=after, limit=limit, wait=wait)
    return json_response(200, page)


@app.post("/v1/jobs/<job_id>/stream/resume")
def resume(job_id: str) -> Response[str]:
    request = parse_body(app, ResumeRequest)
    page = _reader().chunks(job_id, after=request.last_sequence_id, limit=request.limit, wait=request.wait)
    return json_response(200, page)


@app.post("/v1/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response[str]:
    service = _service()
    return json_response(200, service.view(service.cancel(job_id)), service.rate_limit_headers())


lambda_handler = api_handler(app)
