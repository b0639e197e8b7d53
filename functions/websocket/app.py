"""WebSocket API: $connect (authenticated by API key), $disconnect, and ``subscribe``.

A connection stays open for up to two hours after its one authentication, so it records the key it
opened with, and ``subscribe`` checks that key again (as the fanout does before each push): a
connection whose key was revoked gets a final ``unauthorized`` error frame and is closed.
"""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spool_core import bootstrap, snapshot
from spool_core.adapters import aws
from spool_core.adapters.websocket import ManagementApiPusher
from spool_core.api.errors import envelope
from spool_core.auth import extract_api_key
from spool_core.errors import InvalidRequest, SpoolError, Unauthorized
from spool_core.jobs.errors import JobNotFound
from spool_core.jobs.model import MAX_SEQUENCE_ID
from spool_core.observability import logger
from spool_core.tenancy import Tenant
from spool_core.units import now_ms

# Time kept before the invocation's timeout when a long backlog is left to the chunk stream: a push
# takes tens of milliseconds, the hand-back two writes.
HAND_BACK_MARGIN_MS = 5_000
ACTIONS = ["subscribe"]  # the routes a client sends (besides $connect and $disconnect)
MAX_ECHOED_ACTION = 64  # an unknown action longer than this (or not a string) is not echoed back

# What a first $connect and subscribe load (the key lookup, the job service and its stores): before
# a snapshot, not on each new container's first message (see spool_core.snapshot).
snapshot.load_before_snapshot(
    "spool_core.adapters.api_keys",
    "spool_core.jobs.service",
    "spool_core.adapters.jobs",
    "spool_core.adapters.contexts",
    "spool_core.adapters.usage",
    "spool_core.adapters.listing",
    "spool_core.flags",
    "aws_lambda_powertools.utilities.feature_flags",
)


class SubscribeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    action: str
    job_id: str = Field(min_length=1)  # one no job could have is not found (Fanout.subscribe)
    # A JSON number: true (read as 1) or "3" is refused, not guessed at
    after: int = Field(default=0, ge=0, le=MAX_SEQUENCE_ID, strict=True)


def _push_error(connection_id: str, error: SpoolError, request_id: str | None) -> None:
    pusher = ManagementApiPusher(aws.websocket_management(bootstrap.settings()))
    pusher.send(connection_id, {"type": "error", **envelope(error, request_id)})


def _connect(event: dict[str, Any], connection_id: str) -> dict[str, Any]:
    query = event.get("queryStringParameters") or {}
    key = query.get("api_key") or extract_api_key(event.get("headers"))
    record = bootstrap.api_keys().authenticate(key)
    request_id = event["requestContext"].get("requestId")
    # The handshake's answer carries the integration's headers (as a subprotocol is agreed on $connect)
    headers = {"X-Request-Id": str(request_id)} if request_id else {}
    if record is None:
        error = Unauthorized("Missing or invalid API key")
        return {"statusCode": 401, "headers": headers, "body": json.dumps(envelope(error, request_id))}
    bootstrap.connections().put(connection_id, record)  # the tenant and the key, in one write
    bootstrap.connection_guard().admit(connection_id, record)
    return {"statusCode": 200, "headers": headers}


def _subscribe(event: dict[str, Any], connection_id: str, context: LambdaContext) -> dict[str, Any]:
    request_id = event["requestContext"].get("requestId")
    try:
        request = SubscribeRequest.model_validate_json(event.get("body") or "")
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        _push_error(
            connection_id,
            InvalidRequest(
                "Invalid subscribe message",
                details={"fields": fields},
                suggestions=['Send {"action": "subscribe", "job_id": "...", "after": 0}'],
            ),
            request_id,
        )
        return {"statusCode": 200}
    guard = bootstrap.connection_guard()  # remembers who a connection this container admitted is
    identity = guard.identity(connection_id)
    if identity is None:
        _push_error(connection_id, Unauthorized("This connection is not authenticated"), request_id)
        return {"statusCode": 200}
    if not guard.allowed(connection_id, identity.key_hash):
        logger.info("closing a connection whose API key was revoked", extra={"connection_id": connection_id})
        guard.close(connection_id, request_id, job_id=request.job_id, last_sent=request.after)
        return {"statusCode": 200}
    fanout = bootstrap.fanout(Tenant(identity.tenant_id))
    # A backlog longer than the invocation can push is left to the chunk stream before the timeout.
    deadline = now_ms() + context.get_remaining_time_in_millis() - HAND_BACK_MARGIN_MS
    subscribed = fanout.subscribe(
        request.job_id, connection_id, request.after, key_hash=identity.key_hash, deadline_ms=deadline
    )
    if not subscribed:
        _push_error(
            connection_id,
            JobNotFound(f"Job '{request.job_id}' not found", details={"job_id": request.job_id}),
            request_id,
        )
    return {"statusCode": 200}


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    route = event["requestContext"]["routeKey"]
    connection_id = event["requestContext"]["connectionId"]
    if route == "$connect":
        return _connect(event, connection_id)
    if route == "$disconnect":
        bootstrap.connections().delete(connection_id)
        return {"statusCode": 200}
    if route == "subscribe":
        return _subscribe(event, connection_id, context)
    _push_error(connection_id, _unroutable(event.get("body")), event["requestContext"].get("requestId"))
    return {"statusCode": 200}


def _unroutable(body: str | None) -> InvalidRequest:
    """What a message no route took ($default) is told: why its frame could not be read as an action."""
    suggestions = ['Send {"action": "subscribe", "job_id": "...", "after": 0}']
    try:
        message = json.loads(body or "")
    except json.JSONDecodeError as exc:
        return InvalidRequest(
            "The message is not valid JSON",
            details={"fields": [{"field": "body", "message": f"{exc.msg} at character {exc.pos}"}]},
            suggestions=suggestions,
        )
    except (ValueError, RecursionError):  # a number past Python's digit limit, nesting past its depth
        return InvalidRequest(
            "The message is not JSON Spool can read",
            details={"fields": [{"field": "body", "message": "Too deeply nested, or a number too long"}]},
            suggestions=suggestions,
        )
    action = message.get("action") if isinstance(message, dict) else None
    if action is None:
        problem = "a JSON object with an 'action'" if isinstance(message, dict) else "a JSON object"
        return InvalidRequest(
            f"The message must be {problem}",
            details={"fields": [{"field": "action", "message": "Field required"}], "actions": ACTIONS},
            suggestions=suggestions,
        )
    named = isinstance(action, str) and len(action) <= MAX_ECHOED_ACTION
    return InvalidRequest(
        f"Unknown action {json.dumps(action)}" if named else "Unknown action",
        details={
            "fields": [{"field": "action", "message": "Unknown action"}],
            **({"action": action} if named else {}),
            "actions": ACTIONS,
        },
        suggestions=suggestions,
    )
