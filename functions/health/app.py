"""GET /v1/health (no key needed): ok, degraded (a model provider failing) or 503 down (the
database, bucket or queue). ``?deep=true`` adds a real minimal provider call, cached. Also answers
every path no other function serves (404 / 405)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response

from spool_core import bootstrap
from spool_core.api import api_handler, create_resolver, json_response, request_id
from spool_core.api.errors import envelope
from spool_core.errors import DependencyUnavailable

app = create_resolver()


@app.get("/v1/health")
def health() -> Response[str]:
    deep = (app.current_event.get_query_string_value("deep") or "").lower() in {"1", "true", "yes"}
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


lambda_handler = api_handler(app)
