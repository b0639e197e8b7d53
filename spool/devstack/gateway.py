"""API Gateway (REST) emulator: HTTP request -> REST proxy event -> authorizer -> handler -> HTTP.

It follows the template: routes from the functions' ``Api`` events, the authorizer the API names
(its result cached per identity as ``ReauthorizeEvery`` says), the stage's throttle and the usage
plan's per-key throttle, and the API's ``GatewayResponses`` for everything API Gateway itself answers
(denied, no route, too large, throttled, timeout, integration failure). The HTTP side answers what
http.server would answer with an HTML page (a malformed request line, a body that never arrives) with
those gateway responses too, so every answer carries Spool's envelope and X-Request-Id.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import html
import itertools
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from spool.devstack.provision import ACCOUNT_ID
from spool.devstack.runtime import (
    DEFAULT_WAIT_SECONDS,
    HandlerError,
    InvocationError,
    InvocationThrottled,
    InvocationTimeout,
    LocalFunction,
    StreamedResponse,
)
from spool.devstack.template import AuthorizerSpec, Template, Throttle

log = logging.getLogger("devstack.gateway")

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit
WARM_UP_AGENT = "spool-warm-up"  # the stack's own requests before ready: logged at DEBUG only
MAX_LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024  # synchronous Lambda invocation limit
INTEGRATION_TIMEOUT_SECONDS = 29
# How long a read (the rest of the headers, the body) or a write may stall before the connection is
# given up; about what API Gateway's front end waits for a client that stops sending.
READ_TIMEOUT_SECONDS = 20.0
MAX_REQUEST_LINE = 65536  # http.server's own limit; API Gateway's URL limit is lower
MAX_CHUNK_LINE = 4096  # a chunk-size line (with its extensions) or a trailer field of a chunked body
DRAIN_SECONDS = 2.0  # after an early answer, how long the rest of the request is read and dropped
DRAIN_BYTES = 1024 * 1024
# The methods a REST API has; ANY stands for these seven and no other.
HTTP_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})
# Not an API Gateway route: the local stack answers it, so `spool keys|limits` find its AWS endpoint
# and tables without flags. It is served on loopback only, like the rest of the local stack.
LOCAL_INFO_PATH = "/_spool/stack"
# Also local only: cut every open stream of a job (?job_id=), as a network failure would, so a
# client's resume from Last-Event-ID can be seen (the playground's "drop connection"). It needs no
# key (a page on another origin uses it), so it needs the job's id: a page that knows none cuts nothing.
DROP_STREAMS_PATH = "/_spool/drop-streams"
LOCAL_ROUTE_HEADER = "X-Spool-Local"  # marks the local stack's own answers (not API Gateway's)
# The playground (plain HTML and JavaScript) is the local stack's page at `/`; not deployed.
PLAYGROUND = Path(__file__).with_name("playground")
PLAYGROUND_DEFAULT_KEY = b'id="key" value="sk-local-dev"'  # index.html's key field, as a file opened alone
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css",
}
# Headers API Gateway sets itself; a client's copies never reach a function.
GATEWAY_HEADERS = {"x-amzn-request-context", "x-amzn-lambda-context", "x-forwarded-proto", "x-forwarded-port"}
DEFAULT_STATUS = {
    "UNAUTHORIZED": 401,
    "ACCESS_DENIED": 403,
    "MISSING_AUTHENTICATION_TOKEN": 403,
    "INVALID_API_KEY": 403,
    "REQUEST_TOO_LARGE": 413,
    "AUTHORIZER_FAILURE": 500,
    "AUTHORIZER_CONFIGURATION_ERROR": 500,
    "INTEGRATION_FAILURE": 504,
    "INTEGRATION_TIMEOUT": 504,
    "THROTTLED": 429,
    "QUOTA_EXCEEDED": 429,
    "DEFAULT_4XX": 400,
    "DEFAULT_5XX": 502,
}
DEFAULT_MESSAGE = {
    "UNAUTHORIZED": "Unauthorized",
    "ACCESS_DENIED": "User is not authorized to access this resource",
    "MISSING_AUTHENTICATION_TOKEN": "Missing Authentication Token",
    "INVALID_API_KEY": "Forbidden",
    "REQUEST_TOO_LARGE": "Request Too Long",
    "THROTTLED": "Too Many Requests",
    "QUOTA_EXCEEDED": "Limit Exceeded",
    "INTEGRATION_TIMEOUT": "Endpoint request timed out",
    "DEFAULT_5XX": "Internal server error",
}


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    stream: StreamedResponse | None = None  # a streaming integration's body, relayed as it comes


class TokenBucket:
    """API Gateway's throttling algorithm: ``rate`` tokens a second flow into a bucket that holds at
    most ``burst``; a request takes one token or is throttled. A bucket starts full. Time comes from
    ``clock`` (seconds, monotonic), so tests drive it instead of sleeping."""

    def __init__(self, throttle: Throttle, clock: Callable[[], float]) -> None:
        self._rate = throttle.rate
        self._burst = float(throttle.burst)
        self._clock = clock
        self._tokens = self._burst
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there will be one."""
        with self._lock:
            now = self._clock()
            refill = max(0.0, now - self._updated) * self._rate
            self._tokens = min(self._burst, self._tokens + refill)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            if self._rate <= 0 or self._burst < 1:
                return math.inf  # a bucket that never holds a whole token throttles everything
            return (1 - self._tokens) / self._rate


class Buckets:
    """Token buckets by key (a method, an API key, a WebSocket route), each made on first use."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, key: Hashable, throttle: Throttle) -> float:
        """Take a token from the bucket of ``key``: 0.0, or the seconds until one is there."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(throttle, self._clock)
        return bucket.take()


def retry_after(wait: float) -> str:
    """Whole seconds for a Retry-After header: at least 1 (and at most an hour)."""
    return str(max(1, math.ceil(min(wait, 3600.0))))


class AuthorizerCache:
    """API Gateway's authorizer cache: the answer an authorizer gave for one set of identity source
    values, reused for ``ttl`` seconds without invoking it. The cached policy is checked against each
    request's method ARN, as on AWS (a policy naming one resource denies the others from the cache)."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, ...], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, identity: tuple[str, ...]) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(identity)
            if entry is None or entry[0] <= self._clock():
                self._entries.pop(identity, None)
                return None
            return entry[1]

    def put(self, identity: tuple[str, ...], result: dict[str, Any]) -> None:
        with self._lock:
            now = self._clock()
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] > now}
            self._entries[identity] = (now + self._ttl, result)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    function: str
    authorized: bool
    pattern: re.Pattern[str]
    specificity: tuple[int, ...]
    streaming: bool = False
    timeout_seconds: float = INTEGRATION_TIMEOUT_SECONDS
    api_key_required: bool = False

    @classmethod
    def build(
        cls,
        path: str,
        method: str,
        function: str,
        authorized: bool,
        streaming: bool = False,
        timeout_ms: int | None = None,
        api_key_required: bool = False,
    ) -> Route:
        parts, rank = [], []
        for segment in path.strip("/").split("/") if path.strip("/") else []:
            if segment.startswith("{") and segment.endswith("+}"):
                parts.append(f"(?P<{segment[1:-2]}>.+)")
                rank.append(0)
            elif segment.startswith("{") and segment.endswith("}"):
                parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
                rank.append(1)
            else:
                parts.append(re.escape(segment))
                rank.append(2)
        pattern = re.compile("^/" + "/".join(parts) + "$")
        timeout = timeout_ms / 1000 if timeout_ms else INTEGRATION_TIMEOUT_SECONDS
        return cls(
            path, method, function, authorized, pattern, tuple(rank), streaming, timeout, api_key_required
        )


class RestApiEmulator:
    def __init__(
        self,
        template: Template,
        api_id: str,
        functions: Mapping[str, LocalFunction],
        *,
        region: str,
        stage: str,
        resolve: Callable[[Any], Any] = lambda value: value,
        cors_origins: str = "*",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._functions = functions
        self._region = region
        self._stage = stage
        self._api_logical_id = api_id
        self.rest_api_id = uuid.uuid5(uuid.NAMESPACE_DNS, api_id).hex[:10]
        props = template.api(api_id)
        self._gateway_responses: dict[str, Any] = resolve(props.get("GatewayResponses", {}))
        self._cors: dict[str, Any] | None = resolve(props["Cors"]) if "Cors" in props else None
        self._cors_origins = [o.strip().rstrip("/") for o in cors_origins.split(",") if o.strip()] or ["*"]
        self._streams: dict[int, tuple[str, Callable[[], None]]] = {}
        self._stream_ids = itertools.count(1)
        self._streams_lock = threading.Lock()
        self._spec = template.rest_api(api_id)
        self._buckets = Buckets(clock)  # the stage's per-method buckets and the usage plan's per-key ones
        self._authorizer: LocalFunction | None = None
        self._authorizer_spec: AuthorizerSpec | None = None
        self._authorizer_cache: AuthorizerCache | None = None
        if self._spec.default_authorizer:
            self._authorizer_spec = self._spec.authorizers[self._spec.default_authorizer]
            self._authorizer = functions[self._authorizer_spec.function]
            sources = self._authorizer_spec.headers + self._authorizer_spec.query_strings
            if self._authorizer_spec.reauthorize_every > 0 and sources:
                self._authorizer_cache = AuthorizerCache(self._authorizer_spec.reauthorize_every, clock)
        self.local_info: dict[str, Any] = {}  # served at LOCAL_INFO_PATH: how the CLI finds this stack
        # The key the playground's page starts with: the stack's first dev key (SPOOL_DEV_KEYS), which
        # the terminal printed at the start; the page as a file keeps its own default.
        self.playground_key: str | None = None
        self.routes: list[Route] = []
        for name, spec in template.functions().items():
            for event in spec.api_events:
                if event.api == api_id:
                    authorized = event.authorized and self._authorizer is not None
                    key_required = (
                        self._spec.api_key_required
                        if event.api_key_required is None
                        else event.api_key_required
                    )
                    self.routes.append(
                        Route.build(
                            event.path,
                            event.method,
                            name,
                            authorized,
                            event.streaming,
                            event.timeout_ms,
                            key_required,
                        )
                    )

    # ------------------------------------------------------------------ routing
    def match(self, path: str) -> tuple[list[Route], dict[str, str]]:
        """The most specific resource matching ``path`` (API Gateway prefers literal segments)."""
        best: tuple[tuple[int, ...], list[Route], dict[str, str]] | None = None
        for route in self.routes:
            found = route.pattern.match(path)
            if not found:
                continue
            if best is None or route.specificity > best[0]:
                best = (route.specificity, [route], found.groupdict())
            elif route.specificity == best[0] and route.path == best[1][0].path:
                best[1].append(route)
        return (best[1], best[2]) if best else ([], {})

    # ------------------------------------------------------------------ request
    def handle(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        source_ip: str = "127.0.0.1",
    ) -> HttpResponse:
        request_id = str(uuid.uuid4())
        return self._finish(self._handle(method, target, headers, body, source_ip, request_id), headers)

    def refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> HttpResponse:
        """API Gateway's answer to a request it cannot take as sent (malformed, too large, or never
        fully arrived): its REQUEST_TOO_LARGE response for 413, else its DEFAULT_4XX one with this
        status and message."""
        request_id = str(uuid.uuid4())
        if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            response = self.gateway_response("REQUEST_TOO_LARGE", request_id)
        else:
            response = self.gateway_response("DEFAULT_4XX", request_id, status=status, message=message)
        return self._finish(response, headers or {})

    def _finish(self, response: HttpResponse, headers: Mapping[str, str]) -> HttpResponse:
        origin = _header(headers, "Origin")
        gateway_answered = response.status >= 400 and "x-amzn-ErrorType" in response.headers
        local = response.headers.pop(LOCAL_ROUTE_HEADER, None)
        if origin and (gateway_answered or local):
            response.headers.update(self._gateway_cors(origin))  # the template's, or the local routes'
        return response

    def _handle(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        source_ip: str,
        request_id: str,
    ) -> HttpResponse:
        split = urlsplit(target)
        path = unquote(split.path) or "/"
        query = parse_qsl(split.query, keep_blank_values=True)
        if len(body) > MAX_REQUEST_BYTES:
            return self.gateway_response("REQUEST_TOO_LARGE", request_id)
        local = self._local(method, path, query, request_id)
        if local is not None:
            return local
        if method not in HTTP_METHODS:
            # ANY stands for API Gateway's seven methods only, so another one (FOO, PROPFIND) matches no
            # method of the resource; API Gateway answers that as it answers an unknown path, with
            # MISSING_AUTHENTICATION_TOKEN (which the template makes Spool's 404 not_found). A 405 or
            # 501 would read better, but the deployed API cannot send one, and local must not differ.
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)
        resources, path_params = self.match(path)
        if method == "OPTIONS" and self._cors is not None:
            # A mock integration: no authorizer, no function, but a method of the stage all the same.
            refused = self._throttle(resources[0].path if resources else path, "OPTIONS", request_id)
            return refused or self._preflight_key(headers, request_id) or self._preflight(headers, request_id)
        route = next((r for r in resources if r.method in {method, "ANY"}), None)
        if route is None:
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)
        deadline = time.monotonic() + route.timeout_seconds  # the integration timeout covers it all

        # API Gateway applies a client's usage-plan throttle first and the stage's method throttle
        # (MethodSettings) after it, so requests a flooding client has over its own plan are refused
        # without spending the stage's tokens that every other client shares. The per-client throttle
        # needs the key, which (ApiKeySourceType AUTHORIZER) only the authorizer's answer carries; a
        # method that needs no key is throttled by the stage before anything runs.
        if not route.api_key_required and (throttled := self._throttle(route.path, route.method, request_id)):
            return throttled
        event = self._proxy_event(
            method, path, query, headers, body, route, path_params, request_id, source_ip
        )
        authorization: dict[str, Any] = {}
        if route.authorized:
            outcome = self._authorize(event, method, path, request_id, deadline)
            if isinstance(outcome, HttpResponse):
                return outcome
            authorization = outcome
        if route.api_key_required:
            refused = self._usage_plan(headers, authorization, request_id)
            refused = refused or self._throttle(route.path, route.method, request_id)
            if refused is not None:
                return refused
        if _serialized_size(event) > MAX_LAMBDA_PAYLOAD_BYTES:
            return self.gateway_response("REQUEST_TOO_LARGE", request_id)
        function = self._functions[route.function]
        remaining = max(0.001, deadline - time.monotonic())
        try:
            if route.streaming:
                return self._stream(function, event, remaining)
            result = function.invoke(event, timeout=min(function.spec.timeout, remaining), wait=remaining)
        except InvocationTimeout:
            return self.gateway_response("INTEGRATION_TIMEOUT", request_id)
        except InvocationThrottled:
            return self.gateway_response("THROTTLED", request_id)
        except InvocationError as exc:  # the handler raised or its container died: a Lambda function error
            log.error("%s %s: %s", method, path, exc)
            return self.gateway_response("DEFAULT_5XX", request_id)
        return self._proxy_response(result, request_id)

    # ------------------------------------------------------------------ throttling and API keys
    def _throttle(self, resource: str, method: str, request_id: str) -> HttpResponse | None:
        """The stage's throttle of this method (MethodSettings): each method has its own bucket."""
        throttle = self._spec.method_throttle(resource, method)
        if throttle is None:
            return None
        wait = self._buckets.take(("method", resource, method), throttle)
        return self._throttled(wait, request_id) if wait > 0 else None

    def _usage_plan(
        self, headers: Mapping[str, str], authorization: Mapping[str, Any], request_id: str
    ) -> HttpResponse | None:
        """A method that requires an API key: the key (the authorizer's usageIdentifierKey or the
        x-api-key header, as ApiKeySourceType says), then its usage plan's throttle. API Gateway answers
        a missing key with INVALID_API_KEY (403 Forbidden). Locally every key counts as one of the
        plan's keys: there are no API Gateway API keys to check it against."""
        if self._spec.api_key_source == "AUTHORIZER":
            key = authorization.get("usageIdentifierKey")
        else:
            key = _header(headers, "x-api-key")
        if not isinstance(key, str) or not key:
            return self.gateway_response("INVALID_API_KEY", request_id)
        throttle = self._spec.usage_plan_throttle
        if throttle is None:
            return None
        wait = self._buckets.take(("usage-plan", key), throttle)
        return self._throttled(wait, request_id) if wait > 0 else None

    def _preflight_key(self, headers: Mapping[str, str], request_id: str) -> HttpResponse | None:
        """SAM puts an API-wide key requirement on the CORS preflight too, unless the API says
        AddApiKeyRequiredToCorsPreflight: false; a preflight meets no authorizer and carries no key,
        so API Gateway refuses it then."""
        if not (self._spec.api_key_required and self._spec.api_key_required_on_preflight):
            return None
        return self._usage_plan(headers, {}, request_id)

    def _throttled(self, wait: float, request_id: str) -> HttpResponse:
        # API Gateway's own Retry-After is whatever the template wrote; here it says when the bucket
        # has a token again, which is never less than 1 s.
        return self.gateway_response("THROTTLED", request_id, headers={"Retry-After": retry_after(wait)})

    def _stream(self, function: LocalFunction, event: dict[str, Any], remaining: float) -> HttpResponse:
        """A streaming integration (REST response streaming, here to a function run by Lambda Web
        Adapter): status and headers at once, the body relayed as the function writes it."""
        stream = function.open_stream(
            event, timeout=min(function.spec.timeout, remaining), wait=min(remaining, DEFAULT_WAIT_SECONDS)
        )
        response_headers = {k: v for k, v in stream.headers}
        response_headers.setdefault("x-amzn-RequestId", event["requestContext"]["requestId"])
        return HttpResponse(stream.status, response_headers, b"", stream)

    def _local(
        self, method: str, path: str, query: list[tuple[str, str]], request_id: str
    ) -> HttpResponse | None:
        """The local stack's own routes (not API Gateway's): how the CLI finds the stack, and cutting
        streams on purpose."""
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id, LOCAL_ROUTE_HEADER: "1"}
        if path == LOCAL_INFO_PATH and method == "GET" and self.local_info:
            return HttpResponse(200, headers, json.dumps(self.local_info).encode())
        if method == "GET" and (path == "/" or path.startswith("/playground/")):
            return self._static(
                "index.html" if path == "/" else path.removeprefix("/playground/"), request_id
            )
        if path == DROP_STREAMS_PATH and method == "POST":
            job_id = dict(query).get("job_id") or ""
            if not job_id.startswith("job_") or "/" in job_id:
                message = "Name the job whose streams to cut: POST /_spool/drop-streams?job_id=job_..."
                refused = self.gateway_response("DEFAULT_4XX", request_id, status=400, message=message)
                refused.headers[LOCAL_ROUTE_HEADER] = "1"
                return refused
            dropped = self.drop_streams(f"/v1/jobs/{job_id}/")
            return HttpResponse(200, headers, json.dumps({"dropped": dropped}).encode())
        return None

    def _static(self, name: str, request_id: str) -> HttpResponse | None:
        file = (PLAYGROUND / name).resolve()
        if file.parent != PLAYGROUND.resolve() or not file.is_file() or file.suffix not in STATIC_TYPES:
            return None  # not a playground file: API Gateway's routing answers
        headers = {
            "Content-Type": STATIC_TYPES[file.suffix],
            "X-Request-Id": request_id,
            "Cache-Control": "no-cache",
        }
        body = file.read_bytes()
        if name == "index.html" and self.playground_key:
            key = html.escape(self.playground_key, quote=True)
            body = body.replace(PLAYGROUND_DEFAULT_KEY, f'id="key" value="{key}"'.encode(), 1)
        return HttpResponse(200, headers, body)

    # ------------------------------------------------------------------ open streams
    def track_stream(self, path: str, abort: Callable[[], None]) -> int:
        with self._streams_lock:
            number = next(self._stream_ids)
            self._streams[number] = (path, abort)
        return number

    def untrack_stream(self, number: int) -> None:
        with self._streams_lock:
            self._streams.pop(number, None)

    def drop_streams(self, prefix: str = "/") -> int:
        """Cut the client connections of the open streams under ``prefix``; returns how many."""
        with self._streams_lock:
            chosen = [abort for path, abort in self._streams.values() if path.startswith(prefix)]
        for abort in chosen:
            abort()
        return len(chosen)

    # ------------------------------------------------------------------ CORS
    def _allowed_origin(self, origin: str) -> str | None:
        if origin.rstrip("/") in self._cors_origins:
            return origin
        return "*" if "*" in self._cors_origins else None

    def _preflight(self, headers: Mapping[str, str], request_id: str) -> HttpResponse:
        """What SAM's ``Cors`` makes API Gateway answer to ``OPTIONS`` on every resource, with the
        ``X-Request-Id`` DESIGN.md puts on every response. SAM's preflight (a mock integration whose
        headers SAM writes) cannot carry it on AWS, where ``x-amzn-RequestId`` names the request; a
        page never sees a preflight's headers either way (docs/decisions.md)."""
        assert self._cors is not None
        response = {
            "Content-Type": "application/json",
            "x-amzn-RequestId": request_id,
            "X-Request-Id": request_id,
        }
        allowed = self._allowed_origin(_header(headers, "Origin") or "")
        if allowed:
            response.update(self._gateway_cors(_header(headers, "Origin") or ""))
            for key, name in (
                ("AllowMethods", "Access-Control-Allow-Methods"),
                ("AllowHeaders", "Access-Control-Allow-Headers"),
                ("MaxAge", "Access-Control-Max-Age"),
            ):
                if key in self._cors:
                    response[name] = _literal(str(self._cors[key]))
        return HttpResponse(200, response, b"{}")

    def _gateway_cors(self, origin: str) -> dict[str, str]:
        """The allowed origin, and ``Vary: Origin`` where it names the request's (a list of origins):
        no shared cache may hand one origin's answer to another."""
        allowed = self._allowed_origin(origin)
        if not allowed:
            return {}
        return {"Access-Control-Allow-Origin": allowed, **({"Vary": "Origin"} if allowed != "*" else {})}

    def _proxy_event(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        body: bytes,
        route: Route,
        path_params: dict[str, str],
        request_id: str,
        source_ip: str,
    ) -> dict[str, Any]:
        multi_headers: dict[str, list[str]] = {}
        for name, value in headers.items():
            multi_headers.setdefault(name, []).append(value)
        multi_query: dict[str, list[str]] = {}
        for name, value in query:
            multi_query.setdefault(name, []).append(value)
        now = datetime.now(UTC)
        try:
            text, is_base64 = body.decode("utf-8"), False
        except UnicodeDecodeError:
            text, is_base64 = base64.b64encode(body).decode(), True
        return {
            "resource": route.path,
            "path": path,
            "httpMethod": method,
            "headers": dict(headers) or None,
            "multiValueHeaders": multi_headers or None,
            "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
            "multiValueQueryStringParameters": multi_query or None,
            "pathParameters": path_params or None,
            "stageVariables": None,
            "requestContext": {
                "accountId": ACCOUNT_ID,
                "apiId": self.rest_api_id,
                "domainName": headers.get("Host", "127.0.0.1"),
                "domainPrefix": "127",
                "extendedRequestId": request_id,
                "httpMethod": method,
                "identity": {"sourceIp": source_ip, "userAgent": headers.get("User-Agent")},
                # The path as the client sent it: the local stack serves the stage at its root (as a
                # custom domain would), so links built from it point back here.
                "path": path,
                "protocol": "HTTP/1.1",
                "requestId": request_id,
                "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "requestTimeEpoch": int(now.timestamp() * 1000),
                "resourceId": route.path,
                "resourcePath": route.path,
                "stage": self._stage,
            },
            "body": text if body else None,
            "isBase64Encoded": is_base64,
        }

    def method_arn(self, method: str, path: str) -> str:
        return (
            f"arn:aws:execute-api:{self._region}:{ACCOUNT_ID}:{self.rest_api_id}/{self._stage}/{method}/"
            + path.lstrip("/")
        )

    def _identity(self, event: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The values of the authorizer's identity sources, or None when one is missing or empty."""
        assert self._authorizer_spec is not None
        headers = event["headers"] or {}
        query = event["queryStringParameters"] or {}
        values = [_header(headers, name) for name in self._authorizer_spec.headers]
        values += [query.get(name) for name in self._authorizer_spec.query_strings]
        return None if any(not value for value in values) else tuple(str(value) for value in values)

    def _authorize(
        self, event: dict[str, Any], method: str, path: str, request_id: str, deadline: float
    ) -> HttpResponse | dict[str, Any]:
        """Run the authorizer (or take its cached answer): API Gateway's refusal, or the answer."""
        assert self._authorizer is not None
        identity = self._identity(event)
        if identity is None:  # API Gateway answers 401 without invoking the authorizer
            return self.gateway_response("UNAUTHORIZED", request_id)
        auth_event = {
            "type": "REQUEST",
            "methodArn": self.method_arn(method, path),
            **{
                k: event[k]
                for k in (
                    "resource",
                    "path",
                    "httpMethod",
                    "headers",
                    "multiValueHeaders",
                    "queryStringParameters",
                    "multiValueQueryStringParameters",
                    "pathParameters",
                    "stageVariables",
                    "requestContext",
                )
            },
        }
        started = time.monotonic()
        cache = self._authorizer_cache
        result = cache.get(identity) if cache is not None else None
        if result is None:
            try:
                result = self._authorizer.invoke(auth_event, wait=max(0.001, deadline - time.monotonic()))
            except HandlerError as exc:
                if exc.payload.get("errorMessage") == "Unauthorized":
                    return self.gateway_response("UNAUTHORIZED", request_id)
                log.error("authorizer: %s", exc)
                return self.gateway_response("AUTHORIZER_FAILURE", request_id)
            except InvocationError as exc:
                log.error("authorizer: %s", exc)
                return self.gateway_response("AUTHORIZER_FAILURE", request_id)
            if not isinstance(result, dict) or "policyDocument" not in result:
                return self.gateway_response("AUTHORIZER_FAILURE", request_id)
            if cache is not None:
                cache.put(identity, result)
        if not _policy_allows(result["policyDocument"], auth_event["methodArn"]):
            return self.gateway_response("ACCESS_DENIED", request_id)
        context = {k: _stringify(v) for k, v in (result.get("context") or {}).items()}
        event["requestContext"]["authorizer"] = {
            **context,
            "principalId": result.get("principalId"),
            "integrationLatency": int((time.monotonic() - started) * 1000),
        }
        return result

    # ------------------------------------------------------------------ responses
    def _proxy_response(self, result: Any, request_id: str) -> HttpResponse:
        if not isinstance(result, dict) or "statusCode" not in result:
            return self.gateway_response("DEFAULT_5XX", request_id)
        headers = {k: str(v) for k, v in (result.get("headers") or {}).items()}
        for name, values in (result.get("multiValueHeaders") or {}).items():
            headers[name] = ", ".join(str(v) for v in values)
        body = result.get("body") or ""
        raw = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode()
        headers.setdefault("x-amzn-RequestId", request_id)
        return HttpResponse(int(result["statusCode"]), headers, raw)

    def gateway_response(
        self,
        kind: str,
        request_id: str,
        *,
        status: int | None = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Render the template's gateway response of this kind (or its DEFAULT_4XX/5XX fallback).
        ``status`` and ``message`` replace the response's own (for DEFAULT_4XX answers to a request
        that cannot be read); ``headers`` are added to the template's."""
        default_status = status or DEFAULT_STATUS.get(kind, 500)
        family = "DEFAULT_5XX" if default_status >= 500 else "DEFAULT_4XX"
        spec = self._gateway_responses.get(kind) or self._gateway_responses.get(family) or {}
        status = status or int(spec.get("StatusCode", default_status))
        message = message or DEFAULT_MESSAGE.get(kind) or _phrase(status)
        template = (spec.get("ResponseTemplates") or {}).get("application/json") or json.dumps(
            {"message": "$context.error.messageString"}
        ).replace('"$context.error.messageString"', "$context.error.messageString")
        body = (
            template.replace("$context.requestId", request_id)
            .replace("$context.error.messageString", json.dumps(message))  # quoted, as AWS writes it
            .replace("$context.error.message", message)
        )
        response_headers = {
            "Content-Type": "application/json",
            "x-amzn-ErrorType": kind,
            "x-amzn-RequestId": request_id,
        }
        for name, value in ((spec.get("ResponseParameters") or {}).get("Headers") or {}).items():
            value = str(value)
            if name.lower() == "access-control-allow-origin":
                continue  # per request, from SPOOL_CORS_ORIGINS (see handle)
            if value.startswith("'") and value.endswith("'"):
                response_headers[name] = _literal(value)
            elif value == "context.requestId":
                response_headers[name] = request_id
        response_headers.update(headers or {})
        return HttpResponse(status, response_headers, body.encode())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _literal(value: str) -> str:
    """A static value in API Gateway's mapping syntax (``'text'``)."""
    return value[1:-1] if value.startswith("'") and value.endswith("'") else value


def _serialized_size(event: dict[str, Any]) -> int:
    """Size of the event as Lambda receives it, without building a second copy of a large body."""
    body = event.get("body") or ""
    escapes = body.count('"') + body.count("\\") + body.count("\n") + body.count("\t")
    return len(json.dumps({**event, "body": None})) + len(body.encode()) + escapes


def _stringify(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _policy_allows(policy: Mapping[str, Any], method_arn: str) -> bool:
    """IAM evaluation as far as API Gateway needs it: an explicit Deny wins, then any Allow."""
    statements = policy.get("Statement", [])
    allowed = False
    for statement in statements if isinstance(statements, list) else [statements]:
        resources = statement.get("Resource", [])
        resources = resources if isinstance(resources, list) else [resources]
        if not any(fnmatch.fnmatchcase(method_arn, pattern) for pattern in resources):
            continue
        if statement.get("Effect") == "Deny":
            return False
        if statement.get("Effect") == "Allow":
            allowed = True
    return allowed


class _Unreadable(Exception):
    """A request whose body API Gateway would not take: answered with ``status``, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _RequestHandler(BaseHTTPRequestHandler):
    server: GatewayHttpServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body go out in separate writes; with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms a request on a kept-alive connection: 50 polls took 6 s
            # instead of 2 s). Tests serve over socket pairs, which have no such option.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # Every read and write on the connection gives up after this long, so a client that stops
        # sending (a Content-Length it never fills, headers it never ends) cannot hold a thread.
        self.connection.settimeout(self.server.read_timeout)

    def handle_one_request(self) -> None:
        """One request: http.server's step, except that every method reaches the emulator (http.server
        answers a method it has no do_<METHOD> for with an HTML 501) and that a request which stops
        arriving half-way gets a 408 before the connection closes."""
        self.command, self.path, self.headers = "", "", self.MessageClass()
        self._responding = False
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except OSError:  # an idle keep-alive connection timed out, or the client left: close quietly
            self.close_connection = True
            return
        if not self.raw_requestline or self.server.closing:
            # Stopping: the request is left unanswered and the connection closed, as a gateway going
            # away does. A client retries that (an SDK, a browser's EventSource, which gives up for
            # good on any answer but a stream); a 500 from functions already stopped it would not.
            self.close_connection = True
            return
        try:
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline, self.request_version = "", self.protocol_version
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            elif self.parse_request():
                self._serve()
            self.wfile.flush()
        except TimeoutError:  # the headers or the body stopped coming (or the client stopped reading)
            self._stalled()
        except OSError:  # the client went away
            self.close_connection = True

    def _serve(self) -> None:
        started = time.monotonic()
        if self.request_version == "HTTP/0.9":  # `GET /path` without a version
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not supported")
            return
        try:
            body = self._read_body()
        except _Unreadable as problem:
            self._refuse(problem.status, problem.message)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in GATEWAY_HEADERS}
        forwarded_for = self.headers.get("X-Forwarded-For")
        headers.update(  # as API Gateway adds them
            {
                "X-Forwarded-For": f"{forwarded_for}, {self.client_address[0]}"
                if forwarded_for
                else self.client_address[0],
                "X-Forwarded-Port": str(self.server.server_address[1]),
                "X-Forwarded-Proto": "http",
            }
        )
        response = self.server.emulator.handle(self.command, self.path, headers, body, self.client_address[0])
        if self.server.closing and response.status >= 500:  # a function the stop ended answered it
            self.close_connection = True
            return
        self._send(response, started)

    # ------------------------------------------------------------------ request body
    def _content_length(self) -> int | None:
        """The body's declared length, None when it comes chunked. Raises _Unreadable for framing API
        Gateway refuses: a length that is not a number of bytes (400), or one over its payload limit
        (413, answered before any of the body is read)."""
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding:
            if transfer_encoding.split(",")[-1].strip().lower() != "chunked":
                raise _Unreadable(HTTPStatus.BAD_REQUEST, "Transfer-Encoding must end with chunked")
            return None
        values = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not values:
            return 0
        if len(values) > 1:
            raise _Unreadable(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers")
        (value,) = values
        if not (value.isascii() and value.isdigit()):  # negative, empty, not a number
            raise _Unreadable(
                HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, not {value[:40]!r}"
            )
        digits = value.lstrip("0") or "0"
        if len(digits) > 15 or int(digits) > MAX_REQUEST_BYTES:
            raise _Unreadable(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Request Too Long")
        return int(digits)

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length is None:
            return self._read_chunked()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client closed its side early
            raise _Unreadable(HTTPStatus.BAD_REQUEST, f"The body ended after {len(body)} of {length} bytes")
        return body

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112, 7.1), held to the same payload limit as a declared one."""
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            size = line.split(b";", 1)[0].strip()
            if len(line) > MAX_CHUNK_LINE or not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size):
                raise _Unreadable(HTTPStatus.BAD_REQUEST, "Malformed chunked body")
            length = int(size, 16)
            if length == 0:
                break
            if len(body) + length > MAX_REQUEST_BYTES:
                raise _Unreadable(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Request Too Long")
            chunk = self.rfile.read(length)
            if len(chunk) < length or self.rfile.read(2) != b"\r\n":
                raise _Unreadable(HTTPStatus.BAD_REQUEST, "Malformed chunked body")
            body += chunk
        while (line := self.rfile.readline(MAX_CHUNK_LINE + 1)) not in {b"\r\n", b"\n"}:  # trailers
            if not line or len(line) > MAX_CHUNK_LINE:
                raise _Unreadable(HTTPStatus.BAD_REQUEST, "Malformed chunked body")
        return bytes(body)

    def handle_expect_100(self) -> bool:
        # Invite the body only when it will be read: a length API Gateway refuses is answered at once
        # (by _serve), before the client sends any of it.
        try:
            self._content_length()
        except _Unreadable:
            return True
        return super().handle_expect_100()

    # ------------------------------------------------------------------ answers
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or header, an HTTP version it does not
        speak) as API Gateway's DEFAULT_4XX response: Spool's envelope and X-Request-Id, not HTML."""
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer it in HTTP/1.1
            self.request_version = self.protocol_version
        self._refuse(code, message or _phrase(code))

    def _refuse(self, status: int, message: str, *, drain: bool = True) -> None:
        self.close_connection = True  # what is left of the request cannot be told from the next one
        self._send(self.server.emulator.refuse(status, message, dict(self.headers.items())), time.monotonic())
        if drain:
            self._drain()

    def _stalled(self) -> None:
        """A read timed out half-way through a request: 408 if nothing was sent yet, then close."""
        self.close_connection = True
        if not self._responding:
            with contextlib.suppress(OSError):
                message = f"The request did not arrive within {self.server.read_timeout:g} s"
                self._refuse(HTTPStatus.REQUEST_TIMEOUT, message, drain=False)

    def _drain(self) -> None:
        """After answering without reading all of the request: stop sending, then read (and drop) what
        the client still sends for a moment, so that closing does not reset the connection before the
        client has read the answer."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(min(self.server.read_timeout, DRAIN_SECONDS))
            deadline, drained = time.monotonic() + DRAIN_SECONDS, 0
            while drained < DRAIN_BYTES and time.monotonic() < deadline:
                data = self.connection.recv(65536)
                if not data:
                    break
                drained += len(data)

    def _send(self, response: HttpResponse, started: float) -> None:
        self._responding = True
        try:
            outcome = self._answer(response)
        except OSError:  # the answer was made (a context created, a job cancelled): the log says so
            outcome = " (client went away)"
            self.close_connection = True
        warm_up = self.headers.get("User-Agent") == WARM_UP_AGENT  # the stack's own, before ready
        log.log(
            logging.DEBUG if warm_up else logging.INFO,
            "%s %s %d %.0f ms %s%s",
            self.command or "-",
            _redacted(self.path or self.requestline[:100]),
            response.status,
            (time.monotonic() - started) * 1000,
            response.headers.get("X-Request-Id") or response.headers.get("x-amzn-RequestId", ""),
            outcome,
        )

    def _answer(self, response: HttpResponse) -> str:
        """Send the answer; what to add to its log line."""
        self.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() not in {"content-length", "connection", "transfer-encoding"}:
                self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        if response.stream is not None and (self.command == "HEAD" or response.status in (204, 304)):
            # Headers only: a HEAD answer, a 204 and a 304 have no body, chunked or not (a 204 sent
            # chunked left its "0" chunk to be read as the next answer's status line).
            response.stream.close()
            self.end_headers()
            return ""
        if response.stream is not None:
            return self._relay(response.stream)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
            self.wfile.flush()  # a client gone shows here, in this request's line
        return ""

    def _relay(self, stream: StreamedResponse) -> str:
        """Send a streaming integration's body as it comes (chunked). A broken stream (the function
        timed out or crashed) ends the connection without the final chunk, so the client can tell it
        from a complete response; a client that goes away ends the invocation."""
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        tracked = self.server.emulator.track_stream(urlsplit(self.path).path, self._abort)
        outcome = " (streamed)"
        try:
            for data in stream.chunks():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except InvocationError as exc:
            outcome = f" (stream broke off: {exc})"
            self.close_connection = True
        except OSError:  # a client that went away, or stopped reading for longer than the timeout
            outcome = " (client went away)"
            self.close_connection = True
        finally:
            stream.close()
            self.server.emulator.untrack_stream(tracked)
        return outcome

    def _abort(self) -> None:
        """Cut this connection as a network failure would (the client sees it end mid-stream)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # one line per request is logged by _send, through logging


_SECRET_QUERY = re.compile(r"((?:^|[?&])(?:token|api_key)=)[^&#]+", re.IGNORECASE)


def _redacted(path: str) -> str:
    """A request's path as the log shows it: an events token (a year's read access to a job) or a
    key in the query is a credential, and logs are read by more people than keys are."""
    return _SECRET_QUERY.sub(r"\1…", path)


class GatewayHttpServer(ThreadingHTTPServer):
    """The HTTP side, serving a socket the stack has bound (and put in listen mode) itself."""

    daemon_threads = True

    def __init__(
        self, sock: socket.socket, emulator: RestApiEmulator, *, read_timeout: float = READ_TIMEOUT_SECONDS
    ) -> None:
        super().__init__(sock.getsockname(), _RequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.emulator = emulator
        self.read_timeout = read_timeout
        self.closing = False  # the stack is stopping: requests are no longer answered (see the handler)
