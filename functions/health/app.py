"""GET /v1/health (no key needed): ok, degraded (a model provider failing) or 503 down (the
database, bucket or queue). ``?deep=true`` adds a real minimal provider call (one token), cached for
``SPOOL_DEEP_HEALTH_CACHE_SECONDS`` across all callers, so probes, keyed or not, cannot burn money
(DESIGN.md: no key needed). Also answers every path no other function serves (404 / 405)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Query

import spool_core
from spool_core import bootstrap
from spool_core.api.errors import envelope
from spool_core.api.resolver import api_handler, create_resolver, json_response, request_id
from spool_core.errors import DependencyUnavailable

app = create_resolver()
OPENAPI = Path(spool_core.__file__).with_name("openapi.json")


@app.get("/v1/health")
def health(
    deep: Annotated[bool, Query(description="true: also a real call to each provider, cached")] = False,
) -> Response[str]:
    report = bootstrap.health_service(deep=deep).report()
    body = report.as_dict()
    if report.status == "down":
        failing = sorted(name for name, check in report.checks.items() if check.status == "down")
        error = DependencyUnavailable(
            f"Spool is down: {', '.join(failing)} not answering",
            details={"failing": failing},
        )
        body.update(envelope(error, request_id(app)))
        return json_response(503, body)
    return json_response(200, body)


@app.get("/v1/openapi.json", summary="The API's OpenAPI document")
def openapi() -> Response[str]:
    """Built from the functions' routes and models by ``make openapi`` and shipped with the layer."""
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=OPENAPI.read_text())


lambda_handler = api_handler(app)
