"""The HTTP edge of the streaming function's web app (Starlette, run by AWS Lambda Web Adapter):
who the caller is, streaming a generator without holding a thread, errors in Spool's envelope (and
in the shape OpenAI SDKs read on the OpenAI-compatible routes), and CORS.

The caller was authenticated at the edge: the authorizer's context arrives in
``x-amzn-request-context``, set by the adapter from the invocation (never taken from the client).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic_core
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from spool_core import snapshot
from spool_core.api import cors
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
from spool_core.events import Wait
from spool_core.observability import logger
from spool_core.tenancy import InvalidTenantId, Tenant

if TYPE_CHECKING:
    from spool_core.auth import ApiKeys

REQUEST_CONTEXT_HEADER = "x-amzn-request-context"  # the adapter overwrites any copy a client sent
OPENAI_PATHS = ("/v1/chat/", "/v1/responses")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# anyio's asyncio backend, which Starlette's first `run_in_threadpool` imports (~10 ms of CPU; its
# name is what `anyio` itself imports for asyncio): before a snapshot (see spool_core.snapshot).
snapshot.load_before_snapshot("anyio._backends._asyncio")
# A stream's key check as it goes (``Caller.access``), which the first stream loads.
snapshot.load_before_snapshot("spool_core.auth", "spool_core.adapters.api_keys")


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    scope: str  # "*" for an API key, "events:<job_id>" for a links.events token
    request_id: str
    key_hash: str | None = None  # the API key the authorizer checked, or an events token's key

    def require_key(self) -> None:
        """Routes other than one job's event stream need an API key, not an events token."""
        if self.scope != "*":
            raise Unauthorized("This credential only reads one job's event stream; send an API key")

    def access(self, keys: ApiKeys) -> Callable[[], bool] | None:
        """Whether the request's API key (or the key its events token was handed to) is still active,
        for a stream to ask as it goes (through the key cache, as the authorizer does); None when the
        request names no key (an events token made before tokens named one: it expires by itself)."""
        key_hash = self.key_hash
        if key_hash is None:
            return None

        def allowed() -> bool:
            try:
                return keys.check(key_hash) is not None
            except Exception:  # the key table unreachable or throttled: asked again at the next check
                # Open, not closed: a blip must not cut live streams (the stream still ends at its
                # time limit, and every new request goes through the authorizer).
                logger.warning("stream key check failed; the stream goes on", exc_info=True)
                return True

        return allowed


def _request_context(request: Request) -> dict[str, Any]:
    try:
        context = json.loads(request.headers.get(REQUEST_CONTEXT_HEADER) or "{}")
    except ValueError:
        return {}
    return context if isinstance(context, dict) else {}


def request_id(request: Request) -> str:
    """API Gateway's request id (the one in X-Request-Id and in the logs), once per request."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = str(_request_context(request).get("requestId") or uuid.uuid4())
    return str(request.state.request_id)


def query(request: Request, name: str) -> str | None:
    """One query parameter, sent at most once: a repeated one is refused, as the REST routes'
    validation refuses it (a stream read the last and a page read none)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(
            f"The query parameter '{name}' was sent {len(values)} times; send it once",
            details={"param": name, "fields": [{"field": f"query.{name}", "message": "sent more than once"}]},
            suggestions=[f"Send '{name}' once"],
        )
    return values[0] if values else None


# What pydantic reads as a boolean, as the REST routes' validation reads a bool query parameter
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"", "0", "false", "f", "no", "n", "off"})


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter (absent: false); a value that is neither is refused, not read as
    false (``stream=ture`` answered the JSON resource, as if the caller had asked for it)."""
    raw = query(request, name)
    value = (raw or "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise InvalidRequest(
        f"The query parameter '{name}' must be true or false",
        details={
            "param": name,
            "value": (raw or "")[:40],
            "fields": [{"field": f"query.{name}", "message": "must be true or false"}],
        },
        suggestions=[f"Send {name}=true or {name}=false"],
    )


def caller(request: Request) -> Caller:
    authorizer = _request_context(request).get("authorizer") or {}
    rid = request_id(request)
    try:
        tenant = Tenant(str(authorizer["tenant_id"]))
    except (KeyError, InvalidTenantId):
        raise Unauthorized("The request carries no authenticated tenant") from None
    scope = str(authorizer.get("scope") or "*")
    key_hash = authorizer.get("key_hash")  # the key the authorizer checked (or an events token's key)
    return Caller(tenant, scope, rid, str(key_hash) if key_hash else None)


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        # pydantic's parser, as for every other body: it refuses invalid UTF-8, lone surrogates
        # (json.loads lets "\ud800" through to fail later) and nesting past its recursion limit
        return pydantic_core.from_json(raw or b"null")
    except (ValueError, RecursionError):
        message = "The request body is not valid JSON (or is nested too deeply)"
        raise InvalidRequest(
            message,
            details={
                "param": None,
                "fields": [{"field": "body", "message": message, "type": "json_invalid"}],
            },
            suggestions=["Send a JSON object with 'Content-Type: application/json'"],
        ) from None


async def no_body(request: Request) -> None:
    """An operation that takes no body takes nothing, ``{}`` or ``null``; anything else is a 400 naming
    what was sent (the rule and its caps are ``spool_core.api.errors``', as the other functions')."""
    if not (await request.body()).strip():
        return
    unwanted = unwanted_body(await json_body(request))
    if not unwanted:
        return
    names = [".".join(loc)[:MAX_FIELD_NAME] for loc in unwanted[:MAX_FIELD_ERRORS]]
    more = len(unwanted) - len(names)
    raise InvalidRequest(
        f"{TAKES_NO_BODY}; it was sent {', '.join(names)[:MAX_FIELD_NAME]}"
        + (f" and {more:,} more" if more > 0 else ""),
        details={
            "param": unwanted[0][1][:MAX_FIELD_NAME] if len(unwanted[0]) > 1 else None,
            "fields": [
                {"field": name, "message": TAKES_NO_BODY, "type": "extra_forbidden"} for name in names
            ],
            **({"more_fields": more} if more > 0 else {}),
        },
        suggestions=["Send the request with no body"],
    )


async def drive[T](items: Iterator[T | Wait]) -> AsyncIterator[T]:
    """Run a stream's reads (blocking DynamoDB calls) on worker threads and its waits on the event
    loop, so an idle stream holds no thread and many streams share one process."""
    while True:
        item = await run_in_threadpool(next, items, None)
        if item is None:
            return
        if isinstance(item, Wait):
            await asyncio.sleep(item.seconds)
        else:
            yield item


async def last[T](items: Iterator[T | Wait]) -> T | None:
    """Drive ``items`` to the end and return the last thing it yielded (a wait for a job's end)."""
    final = None
    async for item in drive(items):
        final = item
    return final


def sse(events: Iterator[str | Wait], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        drive(events), media_type="text/event-stream", headers={**headers, **SSE_HEADERS}
    )


def json_response(body: Any, headers: dict[str, str], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------- errors
async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in Spool's envelope (with ``Allow`` on a 405)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "GET")
        error: SpoolError = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}",
            details={"method": request.method, "path": request.url.path, "allowed": allowed.split(", ")},
            suggestions=[f"Use one of: {allowed}"],
        )
        error.headers = {"Allow": allowed}
    else:
        error = NotFound(
            f"No route for {request.method} {request.url.path}", details={"path": request.url.path}
        )
    return await domain_error(request, error)


async def domain_error(request: Request, exc: Exception) -> Response:
    error = exc if isinstance(exc, SpoolError) else InternalError("Internal error while handling the request")
    if not isinstance(exc, SpoolError):
        logger.exception("request failed", extra={"code": error.code})
    elif status_for(error) >= 500:
        logger.warning("request failed", extra={"code": error.code, "error": error.message})
    rid = request_id(request)
    shape = openai_envelope if request.url.path.startswith(OPENAI_PATHS) else envelope
    body = shape(error, rid)
    return JSONResponse(body, status_code=status_for(error), headers={**error.headers, "X-Request-Id": rid})


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    SpoolError: domain_error,
    HTTPException: http_error,
    Exception: domain_error,
}


def middleware() -> list[Middleware]:
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=cors.allowed_origins(),
            allow_methods=list(cors.ALLOWED_METHODS),
            allow_headers=list(cors.ALLOWED_HEADERS),
            expose_headers=list(cors.EXPOSED_HEADERS),
            max_age=cors.MAX_AGE_SECONDS,
        )
    ]


__all__ = [
    "EXCEPTION_HANDLERS",
    "Caller",
    "caller",
    "drive",
    "json_body",
    "json_response",
    "last",
    "middleware",
    "request_id",
    "sse",
]
