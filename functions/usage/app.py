"""GET /v1/usage: the tenant's tokens and cost by model and day, and its current limits."""

from __future__ import annotations

import re

from aws_lambda_powertools.event_handler import Response

from spool_core import bootstrap
from spool_core.api import api_handler, create_resolver, json_response, tenant_of
from spool_core.errors import InvalidRequest

app = create_resolver()
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _date(name: str) -> str | None:
    value = app.current_event.get_query_string_value(name)
    if value and not _DATE.match(value):
        raise InvalidRequest(
            f"Query parameter '{name}' must be a date (YYYY-MM-DD)",
            details={"fields": [{"field": f"query.{name}", "message": "expected YYYY-MM-DD"}]},
            suggestions=["Use ?since=2026-11-01&until=2026-11-30 (UTC dates)"],
        )
    return value or None


@app.get("/v1/usage")
def usage() -> Response[str]:
    body = bootstrap.rate_limiter(tenant_of(app)).usage(_date("since"), _date("until"))
    return json_response(200, body, body.pop("headers"))


lambda_handler = api_handler(app)
