"""Powertools REST resolver configured the Spool way.

Every error path ends in the envelope of DESIGN.md: domain errors through their mapped status,
schema violations and malformed JSON as 400 ``invalid_request`` with the fields in ``details``,
unknown routes as 404 ``not_found``, known routes with another method as 405 ``method_not_allowed``,
and anything uncaught as 500 ``internal_error`` (logged with the request id, no trace to the client).
Every response carries ``X-Request-Id``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import pydantic_core
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ValidationError
from snapshot_restore_py import register_before_snapshot

from spool_core.api.cors import allowed_origins, resolver_config
from spool_core.api.errors import (
    MAX_FIELD_ERRORS,
    MAX_FIELD_NAME,
    TAKES_NO_BODY,
    envelope,
    openai_envelope,
    status_for,
    unwanted_body,
)
from spool_core.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    SpoolError,
    Unauthorized,
)
from spool_core.observability import logger, metrics, tracer
from spool_core.tenancy import InvalidTenantId, Tenant

REQUEST_ID_HEADER = "X-Request-Id"
Handler = Callable[[dict[str, Any], LambdaContext], dict[str, Any]]


def request_id(app: APIGatewayRestResolver) -> str | None:
    value: str | None = app.current_event.request_context.request_id
    return value


def json_response(
    status: int, body: Any, headers: dict[str, str] | None = None, *, default: Any = None
) -> Response[str]:
    return Response(
        status_code=status,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps(body, separators=(",", ":"), default=default),
        headers=headers or {},
    )


def error_response(
    app: APIGatewayRestResolver, error: SpoolError, headers: dict[str, str] | None = None
) -> Response[str]:
    shape = openai_envelope if getattr(app, OPENAI_ERRORS, False) else envelope
    return json_response(status_for(error), shape(error, request_id(app)), headers)


def _field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    fields = []
    for err in errors[:MAX_FIELD_ERRORS]:
        location = ".".join(str(part) for part in err.get("loc", ()))[:MAX_FIELD_NAME]
        fields.append({"field": location, "message": err.get("msg", "invalid"), "type": err.get("type", "")})
    return fields


def _field_suggestions(fields: list[dict[str, Any]]) -> list[str]:
    """One suggestion per field, naming where it goes (query parameter, path or body), then the
    document that describes every operation."""
    places = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body field"}
    suggestions = []
    for field in fields[:5]:
        place, _, name = field["field"].partition(".")
        where = places.get(place)
        label = f"{where} '{name}'" if where and name else f"'{field['field']}'"
        suggestions.append(f"Fix the {label}: {field['message']}")
    suggestions.append("Every operation's parameters and body are described in GET /v1/openapi.json")
    return suggestions


def _allowed_methods(app: APIGatewayRestResolver, path: str) -> list[str]:
    # Powertools keeps its routes in these lists; it has no public lookup by path.
    routes = app._static_routes + app._dynamic_routes
    return sorted({route.method for route in routes if route.rule.match(path)})


OPENAI_ERRORS = "spool_openai_errors"  # set on an app whose routes are OpenAI's (errors add type, param)


def create_resolver(*, openai_errors: bool = False) -> APIGatewayRestResolver:
    """The resolver of a function's routes, its errors in Spool's envelope (with OpenAI's ``type``
    and ``param`` besides when ``openai_errors``: routes OpenAI's SDKs call, such as /v1/models)."""
    app = APIGatewayRestResolver(enable_validation=True, cors=resolver_config())
    setattr(app, OPENAI_ERRORS, openai_errors)
    # Every route's models and validators, built once before a snapshot (see spool_core.snapshot)
    # instead of on each new container's first request.
    register_before_snapshot(app.get_openapi_schema)

    @app.exception_handler(SpoolError)  # type: ignore[untyped-decorator]
    def _domain_error(exc: SpoolError) -> Response[str]:
        if status_for(exc) >= 500:
            logger.exception("request failed", extra={"code": exc.code})
        return error_response(app, exc, exc.headers)

    @app.exception_handler(RequestValidationError)  # type: ignore[untyped-decorator]
    def _invalid(exc: RequestValidationError) -> Response[str]:
        errors = exc.errors()
        fields = _field_errors(errors)
        if any(f["type"] == "json_invalid" for f in fields):
            error = InvalidRequest(
                "The request body is not valid JSON",
                details={"fields": fields},
                suggestions=["Send a JSON object with 'Content-Type: application/json'"],
            )
        else:
            names = ", ".join(f["field"] for f in fields)
            more = len(errors) - len(fields)
            error = InvalidRequest(
                f"The request does not match the schema: {names}"
                + (f" and {more:,} more" if more > 0 else ""),
                details={"fields": fields, **({"more_fields": more} if more > 0 else {})},
                suggestions=_field_suggestions(fields),
            )
        return error_response(app, error)

    @app.not_found
    def _not_found(_: NotFoundError) -> Response[str]:
        event = app.current_event
        allowed = _allowed_methods(app, event.path)
        if allowed:
            error: SpoolError = MethodNotAllowed(
                f"{event.http_method} is not allowed on {event.path}",
                details={"method": event.http_method, "path": event.path, "allowed": allowed},
                suggestions=[f"Use one of: {', '.join(allowed)}"],
            )
            return error_response(app, error, {"Allow": ", ".join(allowed)})
        return error_response(
            app, NotFound(f"No route for {event.http_method} {event.path}", details={"path": event.path})
        )

    @app.exception_handler(Exception)  # type: ignore[untyped-decorator]
    def _uncaught(exc: Exception) -> Response[str]:
        logger.exception("unhandled error", extra={"request_id": request_id(app)})
        return error_response(app, InternalError("Internal error while handling the request"))

    return app


def parse_body[M: BaseModel](app: APIGatewayRestResolver, model: type[M]) -> M:
    """Parse the JSON body straight into ``model`` (pydantic reads the JSON text itself, so no
    intermediate dict copy of a multi-MB payload is made). Errors take the same 400 path as the
    resolver's own validation."""
    event = app.current_event
    # Bytes, not text: pydantic checks the UTF-8 itself, so bad bytes are a 400 like any bad JSON
    # (decoding first would raise outside the validation path). Nesting past its recursion limit
    # is reported the same way.
    raw = event.body or ""
    body = base64.b64decode(raw) if event.is_base64_encoded else raw.encode("utf-8", "surrogateescape")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_input=False)]
        raise RequestValidationError(errors) from None


def refuse_body(app: APIGatewayRestResolver) -> None:
    """An operation that takes no body takes nothing, ``{}`` or ``null``, and refuses anything else as
    a schema violation (400, the fields named): malformed JSON, or fields a client meant for another
    operation. Checked by hand: a model class per such route is import time every function pays."""
    event = app.current_event
    raw = event.body or ""
    if not raw.strip():
        return
    body = base64.b64decode(raw) if event.is_base64_encoded else raw.encode("utf-8", "surrogateescape")
    try:
        value = pydantic_core.from_json(body)
    except (ValueError, RecursionError):
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "Invalid JSON", "type": "json_invalid"}]
        ) from None
    unwanted = unwanted_body(value)
    if unwanted:
        raise RequestValidationError(
            [
                {
                    "loc": loc,
                    "msg": TAKES_NO_BODY if len(loc) > 1 else f"{TAKES_NO_BODY} (at most {{}})",
                    "type": "extra_forbidden",
                }
                for loc in unwanted
            ]
        )


def tenant_of(app: APIGatewayRestResolver) -> Tenant:
    """The caller's tenant, as the authorizer resolved it. Its absence is a deployment error, not a 404."""
    context = app.current_event.request_context.authorizer.get_context() or {}
    tenant_id = context.get("tenant_id")
    if not tenant_id:
        raise Unauthorized("The request carries no authenticated tenant")
    if context.get("scope", "*") != "*":  # an events token opens one stream, never these routes
        raise Unauthorized("This credential only reads one job's event stream; send an API key")
    try:
        return Tenant(str(tenant_id))
    except InvalidTenantId as exc:
        raise Unauthorized("The authenticated tenant id is invalid") from exc


def key_id_of(app: APIGatewayRestResolver) -> str | None:
    """The id of the API key the authorizer checked (what ``links.events`` tokens are handed to)."""
    key_id = (app.current_event.request_context.authorizer.get_context() or {}).get("key_id")
    return str(key_id) if key_id else None


def public_base_url(app: APIGatewayRestResolver) -> str:
    """The API's own base URL as the caller reached it (``SPOOL_PUBLIC_URL`` when configured, e.g.
    behind a custom domain): scheme and host from the forwarding headers API Gateway adds, the stage
    prefix from the request context's path."""
    configured = os.environ.get("SPOOL_PUBLIC_URL")
    if configured:
        return configured.rstrip("/")
    event = app.current_event
    proto = event.headers.get("X-Forwarded-Proto") or "https"
    host = event.headers.get("Host") or event.request_context.domain_name
    full = event.request_context.path or event.path
    prefix = full[: -len(event.path)] if event.path and full.endswith(event.path) else ""
    return f"{proto}://{host}{prefix}"


def _with_request_id(response: dict[str, Any], event: dict[str, Any], *, vary: bool) -> dict[str, Any]:
    """The request id on every response; and, with ``vary``, ``Vary: Origin``: where the allowed
    origin a response names depends on the request's (a list of origins), so no cache hands one
    origin's answer to another."""
    added: dict[str, str] = {}
    rid = (event.get("requestContext") or {}).get("requestId")
    if rid:
        added[REQUEST_ID_HEADER] = rid
    if vary:
        added["Vary"] = "Origin"
    for name, value in added.items():
        response.setdefault("headers", {})[name] = value
        if "multiValueHeaders" in response:
            response["multiValueHeaders"][name] = [value]
    return response


_FORM = "application/x-www-form-urlencoded"


def _as_json(event: dict[str, Any]) -> dict[str, Any]:
    """Every body of this API is JSON. Clients such as ``curl -d`` label it form-encoded by default;
    read such bodies (and unlabelled ones) as JSON rather than as a form."""
    if not event.get("body"):
        return event
    headers = event.get("headers") or {}
    names = [k for k in headers if k.lower() == "content-type"]
    if names and not headers[names[0]].lower().startswith(_FORM):
        return event
    fixed = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    fixed["Content-Type"] = "application/json"
    multi = {k: v for k, v in (event.get("multiValueHeaders") or {}).items() if k.lower() != "content-type"}
    multi["Content-Type"] = ["application/json"]
    return {**event, "headers": fixed, "multiValueHeaders": multi}


def api_handler(app: APIGatewayRestResolver) -> Handler:
    """The Lambda entry point for a resolver: logging with correlation id, tracing, metrics, X-Request-Id."""
    vary = allowed_origins() != ["*"]  # read once, as the resolver's CORS configuration was

    @logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True)
    @tracer.capture_lambda_handler
    @metrics.log_metrics
    def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        return _with_request_id(app.resolve(_as_json(event), context), event, vary=vary)

    return handler


__all__ = [
    "NotFound",
    "api_handler",
    "create_resolver",
    "json_response",
    "key_id_of",
    "public_base_url",
    "request_id",
    "tenant_of",
]
