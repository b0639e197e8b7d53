"""Helpers shared by the test tiers: the sample events of events/ and small builders on top of them."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Iterator
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


def wait_for[T](
    condition: Callable[[], T], *, timeout: float = 60, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy (returned), failing after ``timeout``
    seconds: the one way tests wait (generous deadlines: a loaded CI machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or condition}: last {value!r}"
            )
        time.sleep(interval)


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events from a stream's lines, parsed as the HTML spec says: ``field: value``
    lines, ``:`` comments, a blank line ends an event. Yields {"id", "event", "data"} per event (data
    parsed as JSON) and {"comment": text} per comment."""
    event: dict[str, Any] = {}
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                event["data"] = json.loads("\n".join(data))
            if event:
                event.setdefault("event", "message")
                yield event
            event, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            yield {"comment": value}
        elif name == "data":
            data.append(value)
        elif name in {"id", "event", "retry"}:
            event[name] = value
