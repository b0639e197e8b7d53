"""/v1/jobs: create generation jobs idempotently, read and list them, cancel (``JobsFunction``). The
chunk log's pages are ``chunks.py``'s (``ChunksFunction``)."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Query

from spool_core import bootstrap, listing, snapshot
from spool_core.api.resolver import (
    api_handler,
    create_resolver,
    json_response,
    key_id_of,
    parse_body,
    public_base_url,
    refuse_body,
    tenant_of,
)
from spool_core.jobs.model import JobRequest
from spool_core.jobs.service import (
    STATUSES,
    JobService,
    check_idempotency_key,
)

app = create_resolver()
# What creating the first job loads (the stores, the queue, flags, the secret's provider): before a
# snapshot, not on each new container's first request (see spool_core.snapshot).
snapshot.load_before_snapshot(
    *snapshot.JOB_CREATION_MODULES,
    "spool_core.adapters.listing",
    "spool_core.events",
    "aws_lambda_powertools.utilities.parameters",
)


def _service() -> JobService:
    return bootstrap.job_service(tenant_of(app), public_url=public_base_url(app), key_id=key_id_of(app))


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


@app.post("/v1/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response[str]:
    refuse_body(app)
    service = _service()
    return json_response(200, service.view(service.cancel(job_id)), service.rate_limit_headers())


lambda_handler = api_handler(app)
