"""Helpers shared by the test tiers: the sample events of events/ and small builders on top of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"


def load_event(name: str) -> dict[str, Any]:
    """A fresh copy of ``events/<name>.json`` (the same files `sam local invoke -e` takes)."""
    event: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return copy.deepcopy(event)


def api_event(
    method: str,
    path: str,
    *,
    body: Any = None,
    tenant: str | None = "local",
    resource: str | None = None,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A REST proxy event derived from events/contexts.json for another method, path or body."""
    event = load_event("contexts")
    event["httpMethod"] = method
    event["path"] = path
    event["resource"] = resource or path
    event["pathParameters"] = None
    event["requestContext"]["httpMethod"] = method
    event["requestContext"]["path"] = f"/prod{path}"
    event["queryStringParameters"] = query
    event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()} if query else None
    if headers:
        event["headers"].update(headers)
        event["multiValueHeaders"].update({k: [v] for k, v in headers.items()})
    if tenant is None:
        del event["requestContext"]["authorizer"]
    else:
        event["requestContext"]["authorizer"]["tenant_id"] = tenant
    if body is not None:
        event["body"] = body if isinstance(body, str) else json.dumps(body)
    return event


def response_json(response: dict[str, Any]) -> Any:
    return json.loads(response["body"])
