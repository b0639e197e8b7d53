"""/v1/jobs/{id}/chunks and /v1/jobs/{id}/stream/resume: pages of a job's chunk log, long-polled
(``ChunksFunction``). Beside the jobs function's code, but loading only the log's reader
(``spool_core.jobs.pages``): no admission, contexts, limits or model registry, and no rate-limit
reads per page."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import BaseModel, ConfigDict, Field

from spool_core import bootstrap, snapshot
from spool_core.api.resolver import api_handler, create_resolver, json_response, parse_body, tenant_of
from spool_core.jobs.model import MAX_SEQUENCE_ID
from spool_core.jobs.pages import DEFAULT_CHUNK_LIMIT, MAX_CHUNK_LIMIT, MAX_WAIT_SECONDS, ChunkPages

app = create_resolver()
# What the first page loads (the stores): before a snapshot (see spool_core.snapshot).
snapshot.load_before_snapshot("spool_core.adapters.jobs")


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # JSON numbers, as the WebSocket's subscribe takes them: true (read as 1), "3" or 3.5 is refused,
    # not guessed at (a cursor guessed wrong repeats or skips chunks)
    last_sequence_id: int = Field(default=0, ge=0, le=MAX_SEQUENCE_ID, strict=True)
    limit: int = Field(default=DEFAULT_CHUNK_LIMIT, ge=1, le=MAX_CHUNK_LIMIT, strict=True)
    wait: float = Field(default=0, ge=0, le=MAX_WAIT_SECONDS, strict=True)


def _pages() -> ChunkPages:
    return bootstrap.chunk_pages(tenant_of(app))


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
    page: dict[str, Any] = _pages().chunks(job_id, after=after, limit=limit, wait=wait)
    return json_response(200, page)


@app.post("/v1/jobs/<job_id>/stream/resume")
def resume(job_id: str) -> Response[str]:
    request = parse_body(app, ResumeRequest)
    page = _pages().chunks(job_id, after=request.last_sequence_id, limit=request.limit, wait=request.wait)
    return json_response(200, page)


lambda_handler = api_handler(app)
