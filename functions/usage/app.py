"""GET /v1/usage: the tenant's tokens and cost by model and day, and its current limits."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Query

from spool_core import bootstrap
from spool_core.api.resolver import api_handler, create_resolver, json_response, tenant_of

app = create_resolver()


@app.get("/v1/usage", summary="Tokens and cost by model and day, and the current limits")
def usage(
    since: Annotated[
        date | None, Query(description="first UTC day, YYYY-MM-DD (default: 6 days before until)")
    ] = None,
    until: Annotated[date | None, Query(description="last UTC day, YYYY-MM-DD (default: today)")] = None,
) -> Response[str]:
    body = bootstrap.rate_limiter(tenant_of(app)).usage(since, until)
    return json_response(200, body, body.pop("headers"))


lambda_handler = api_handler(app)
