"""API Gateway (REST) emulator: HTTP request -> REST proxy event -> authorizer -> handler -> HTTP.

It follows the template: routes from the functions' ``Api`` events, the authorizer the API names,
and the API's ``GatewayResponses`` for everything API Gateway itself answers (denied, no route,
too large, timeout, integration failure).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from spool.devstack.provision import ACCOUNT_ID
from spool.devstack.runtime import (
    HandlerError,
    InvocationError,
    InvocationThrottled,
    InvocationTimeout,
    LocalFunction,
)
from spool.devstack.template import Template

log = logging.getLogger("devstack.gateway")

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit
MAX_LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024  # synchronous Lambda invocation limit
INTEGRATION_TIMEOUT_SECONDS = 29
# Not an API Gateway route: the local stack answers it, so `spool keys|limits` find its AWS endpoint
# and tables without flags. It is served on loopback only, like the rest of the local stack.
LOCAL_INFO_PATH = "/_spool/stack"
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


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    function: str
    authorized: bool
    pattern: re.Pattern[str]
    specificity: tuple[int, ...]

    @classmethod
    def build(cls, path: str, method: str, function: str, authorized: bool) -> Route:
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
        return cls(path, method, function, authorized, pattern, tuple(rank))


class RestApiEmulator:
    def __init__(
        self,
        template: Template,
        api_id: str,
        functions: Mapping[str, LocalFunction],
        *,
        region: str,
        stage: str,
    ) -> None:
        self._functions = functions
        self._region = region
        self._stage = stage
        self._api_logical_id = api_id
        self.rest_api_id = uuid.uuid5(uuid.NAMESPACE_DNS, api_id).hex[:10]
        props = template.api(api_id)
        self._gateway_responses: dict[str, Any] = props.get("GatewayResponses", {})
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
                    self.routes.append(Route.build(event.path, event.method, name, authorized))

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
        deadline = time.monotonic() + INTEGRATION_TIMEOUT_SECONDS
        split = urlsplit(target)
        path = unquote(split.path) or "/"
        query = parse_qsl(split.query, keep_blank_values=True)
        if len(body) > MAX_REQUEST_BYTES:
            return self.gateway_response("REQUEST_TOO_LARGE", request_id)
        if path == LOCAL_INFO_PATH and method == "GET" and self.local_info:
            return HttpResponse(
                200,
                {"Content-Type": "application/json", "X-Request-Id": request_id},
                json.dumps(self.local_info).encode(),
            )
        resources, path_params = self.match(path)
        route = next((r for r in resources if r.method in {method, "ANY"}), None)
        if route is None:
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)

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
        remaining = max(0.001, deadline - time.monotonic())  # the integration timeout covers it all
        try:
            result = function.invoke(event, timeout=min(function.spec.timeout, remaining), wait=remaining)
        except InvocationTimeout:
            return self.gateway_response("INTEGRATION_TIMEOUT", request_id)
        except InvocationThrottled:
            return self.gateway_response("THROTTLED", request_id)
        except InvocationError as exc:  # the handler raised or its container died: a Lambda function error
            log.error("%s %s: %s", method, path, exc)
            return self.gateway_response("DEFAULT_5XX", request_id)
        return self._proxy_response(result, request_id)

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
                "path": f"/{self._stage}{path}",
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
            if value.startswith("'") and value.endswith("'"):
                headers[name] = value[1:-1]
            elif value == "context.requestId":
                headers[name] = request_id
        return HttpResponse(status, headers, body.encode())


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
        headers = {k: v for k, v in self.headers.items()}
        response = self.server.emulator.handle(self.command, self.path, headers, body, self.client_address[0])
        log.info(
            "%s %s %d %.0f ms %s",
            self.command,
            self.path,
            response.status,
            (time.monotonic() - started) * 1000,
            response.headers.get("X-Request-Id") or response.headers.get("x-amzn-RequestId", ""),
        )
        self.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() not in {"content-length", "connection", "transfer-encoding"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

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
