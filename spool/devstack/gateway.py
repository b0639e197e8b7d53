"""API Gateway (REST) emulator: HTTP request -> REST proxy event -> authorizer -> handler -> HTTP.

It follows the template: routes from the functions' ``Api`` events, the authorizer the API names,
and the API's ``GatewayResponses`` for everything API Gateway itself answers (denied, no route,
too large, timeout, integration failure).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import itertools
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
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
from spool.devstack.template import Template

log = logging.getLogger("devstack.gateway")

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit
MAX_LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024  # synchronous Lambda invocation limit
INTEGRATION_TIMEOUT_SECONDS = 29
# Not an API Gateway route: the local stack answers it, so `spool keys|limits` find its AWS endpoint
# and tables without flags. It is served on loopback only, like the rest of the local stack.
LOCAL_INFO_PATH = "/_spool/stack"
# Also local only: cut every open stream of a job (?job_id=) or all of them, as a network failure
# would, so a client's resume from Last-Event-ID can be seen (the playground's "drop connection").
DROP_STREAMS_PATH = "/_spool/drop-streams"
LOCAL_ROUTE_HEADER = "X-Spool-Local"  # marks the local stack's own answers (not API Gateway's)
# The playground (plain HTML and JavaScript) is the local stack's page at `/`; not deployed.
PLAYGROUND = Path(__file__).with_name("playground")
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
    "REQUEST_TOO_LARGE": 413,
    "AUTHORIZER_FAILURE": 500,
    "AUTHORIZER_CONFIGURATION_ERROR": 500,
    "INTEGRATION_FAILURE": 504,
    "INTEGRATION_TIMEOUT": 504,
    "THROTTLED": 429,
    "DEFAULT_4XX": 400,
    "DEFAULT_5XX": 502,
}
DEFAULT_MESSAGE = {
    "UNAUTHORIZED": "Unauthorized",
    "ACCESS_DENIED": "User is not authorized to access this resource",
    "MISSING_AUTHENTICATION_TOKEN": "Missing Authentication Token",
    "REQUEST_TOO_LARGE": "Request Too Long",
    "INTEGRATION_TIMEOUT": "Endpoint request timed out",
    "DEFAULT_5XX": "Internal server error",
}


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    stream: StreamedResponse | None = None  # a streaming integration's body, relayed as it comes


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

    @classmethod
    def build(
        cls,
        path: str,
        method: str,
        function: str,
        authorized: bool,
        streaming: bool = False,
        timeout_ms: int | None = None,
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
        return cls(path, method, function, authorized, pattern, tuple(rank), streaming, timeout)


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
        auth = props.get("Auth", {})
        default_authorizer = auth.get("DefaultAuthorizer")
        self._authorizer: LocalFunction | None = None
        if default_authorizer:
            arn = auth["Authorizers"][default_authorizer]["FunctionArn"]
            self._authorizer = functions[arn["Fn::GetAtt"][0]]
        self.local_info: dict[str, Any] = {}  # served at LOCAL_INFO_PATH: how the CLI finds this stack
        self.routes: list[Route] = []
        for name, spec in template.functions().items():
            for event in spec.api_events:
                if event.api == api_id:
                    authorized = event.authorized and self._authorizer is not None
                    self.routes.append(
                        Route.build(
                            event.path, event.method, name, authorized, event.streaming, event.timeout_ms
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
        origin = _header(headers, "Origin")
        response = self._handle(method, target, headers, body, source_ip, request_id)
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
        resources, path_params = self.match(path)
        if method == "OPTIONS" and self._cors is not None:
            return self._preflight(headers, request_id)  # a mock integration: no authorizer, no function
        route = next((r for r in resources if r.method in {method, "ANY"}), None)
        if route is None:
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)
        deadline = time.monotonic() + route.timeout_seconds  # the integration timeout covers it all

        event = self._proxy_event(
            method, path, query, headers, body, route, path_params, request_id, source_ip
        )
        if route.authorized:
            denied = self._authorize(event, method, path, request_id, deadline)
            if denied is not None:
                return denied
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
            job_id = dict(query).get("job_id")
            dropped = self.drop_streams(f"/v1/jobs/{job_id}/" if job_id else "/")
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
        return HttpResponse(200, headers, file.read_bytes())

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
        """What SAM's ``Cors`` makes API Gateway answer to ``OPTIONS`` on every resource."""
        assert self._cors is not None
        response = {"Content-Type": "application/json", "x-amzn-RequestId": request_id}
        allowed = self._allowed_origin(_header(headers, "Origin") or "")
        if allowed:
            response["Access-Control-Allow-Origin"] = allowed
            for key, name in (
                ("AllowMethods", "Access-Control-Allow-Methods"),
                ("AllowHeaders", "Access-Control-Allow-Headers"),
                ("MaxAge", "Access-Control-Max-Age"),
            ):
                if key in self._cors:
                    response[name] = _literal(str(self._cors[key]))
        return HttpResponse(200, response, b"{}")

    def _gateway_cors(self, origin: str) -> dict[str, str]:
        allowed = self._allowed_origin(origin)
        return {"Access-Control-Allow-Origin": allowed} if allowed else {}

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

    def _authorize(
        self, event: dict[str, Any], method: str, path: str, request_id: str, deadline: float
    ) -> HttpResponse | None:
        assert self._authorizer is not None
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
        if not _policy_allows(result["policyDocument"], auth_event["methodArn"]):
            return self.gateway_response("ACCESS_DENIED", request_id)
        context = {k: _stringify(v) for k, v in (result.get("context") or {}).items()}
        event["requestContext"]["authorizer"] = {
            **context,
            "principalId": result.get("principalId"),
            "integrationLatency": int((time.monotonic() - started) * 1000),
        }
        return None

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

    def gateway_response(self, kind: str, request_id: str) -> HttpResponse:
        """Render the template's gateway response of this kind (or its DEFAULT_4XX/5XX fallback)."""
        status = DEFAULT_STATUS.get(kind, 500)
        family = "DEFAULT_5XX" if status >= 500 else "DEFAULT_4XX"
        spec = self._gateway_responses.get(kind) or self._gateway_responses.get(family) or {}
        status = int(spec.get("StatusCode", status))
        message = DEFAULT_MESSAGE.get(kind, HTTPStatus(status).phrase)
        template = (spec.get("ResponseTemplates") or {}).get("application/json") or json.dumps(
            {"message": "$context.error.messageString"}
        )
        body = (
            template.replace("$context.requestId", request_id)
            .replace("$context.error.messageString", json.dumps(message)[1:-1])
            .replace("$context.error.message", message)
        )
        headers = {
            "Content-Type": "application/json",
            "x-amzn-ErrorType": kind,
            "x-amzn-RequestId": request_id,
        }
        for name, value in ((spec.get("ResponseParameters") or {}).get("Headers") or {}).items():
            value = str(value)
            if name.lower() == "access-control-allow-origin":
                continue  # per request, from SPOOL_CORS_ORIGINS (see handle)
            if value.startswith("'") and value.endswith("'"):
                headers[name] = _literal(value)
            elif value == "context.requestId":
                headers[name] = request_id
        return HttpResponse(status, headers, body.encode())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


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


class _RequestHandler(BaseHTTPRequestHandler):
    server: GatewayHttpServer
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
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
        self.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() not in {"content-length", "connection", "transfer-encoding"}:
                self.send_header(name, value)
        if response.stream is not None:
            outcome = self._relay(response.stream)
        else:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            outcome = ""
        log.info(
            "%s %s %d %.0f ms %s%s",
            self.command,
            self.path,
            response.status,
            (time.monotonic() - started) * 1000,
            response.headers.get("X-Request-Id") or response.headers.get("x-amzn-RequestId", ""),
            outcome,
        )

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
        except OSError:
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

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        return None  # one line per request is logged by _serve, through logging


class GatewayHttpServer(ThreadingHTTPServer):
    """The HTTP side, serving a socket the stack has bound (and put in listen mode) itself."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, emulator: RestApiEmulator) -> None:
        super().__init__(sock.getsockname(), _RequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.emulator = emulator
