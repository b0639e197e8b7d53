"""/v1/contexts and /v1/tokens/count: upload context once, reference it by id, update it by
sending only what changed, and count what a request would cost in tokens."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Query

from spool_core import bootstrap, listing
from spool_core.api.resolver import (
    api_handler,
    create_resolver,
    json_response,
    parse_body,
    refuse_body,
    tenant_of,
)
from spool_core.contexts.model import CreateContextRequest, PatchContextRequest, TokenCountRequest
from spool_core.errors import InvalidRequest
from spool_core.observability import logger

app = create_resolver()


# Context bodies can be many MB: they are parsed with parse_body (JSON text straight into the model)
# rather than by the resolver's validation, which would first build a dict copy of the payload.
@app.post("/v1/contexts")
def create_context() -> Response[str]:
    request = parse_body(app, CreateContextRequest)
    service = bootstrap.context_service(tenant_of(app))
    summary = service.create(request)
    logger.info("context created", extra={"context_id": summary["context_id"], **vars(service.last_stats)})
    return json_response(
        201, summary, {"Location": f"/v1/contexts/{summary['context_id']}", **_etag(summary)}
    )


@app.get("/v1/contexts", summary="The tenant's contexts, newest first, without their file lists")
def list_contexts(
    limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)] = listing.DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> Response[str]:
    tenant = tenant_of(app)
    codec = listing.cursor_codec(bootstrap.settings())
    page = bootstrap.context_service(tenant).list_contexts(tenant, codec, limit=limit, cursor=cursor)
    return json_response(200, page.body())


@app.post("/v1/contexts/uploads")
def create_upload() -> Response[str]:
    refuse_body(app)
    return json_response(201, bootstrap.context_service(tenant_of(app)).begin_upload())


@app.get("/v1/contexts/<context_id>")
def get_context(context_id: str) -> Response[str]:
    context = bootstrap.context_service(tenant_of(app)).get(context_id)
    return json_response(200, context, _etag(context))


@app.patch("/v1/contexts/<context_id>")
def patch_context(context_id: str) -> Response[str]:
    request = parse_body(app, PatchContextRequest)
    service = bootstrap.context_service(tenant_of(app))
    if_version = _if_match(app.current_event.get_header_value("If-Match", case_sensitive=False))
    summary = service.patch(context_id, request, if_version=if_version)
    logger.info("context updated", extra={"context_id": context_id, **vars(service.last_stats)})
    return json_response(200, summary, _etag(summary))


@app.delete("/v1/contexts/<context_id>")
def delete_context(context_id: str) -> Response[str]:
    bootstrap.context_service(tenant_of(app)).delete(context_id)
    return Response(status_code=204, body="")


@app.post("/v1/tokens/count")
def count_tokens() -> Response[str]:
    request = parse_body(app, TokenCountRequest)
    tenant = tenant_of(app)
    model = bootstrap.catalog(tenant).resolve(request.model)  # only the models this tenant may use
    service = bootstrap.context_service(tenant)
    return json_response(200, service.count_tokens(model, request.context_id, request.messages))


def _etag(context: dict[str, object]) -> dict[str, str]:
    """The version as an entity tag: what a PATCH's If-Match names."""
    return {"ETag": f'"{context["version"]}"'}


def _if_match(header: str | None) -> int | None:
    """The version an ``If-Match`` names (``"3"``, ``W/"3"`` or ``3``); None for none, or ``*``."""
    if header is None or header.strip() == "*":
        return None
    tag = header.strip().removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdecimal()) or len(tag) > 15:
        raise InvalidRequest(
            f"If-Match {header[:40]!r} names no version of a context",
            details={"field": "If-Match", "fields": [{"field": "If-Match", "message": "not a version"}]},
            suggestions=['Send the ETag a read or an update returned, e.g. If-Match: "3"'],
        )
    return int(tag)


lambda_handler = api_handler(app)
