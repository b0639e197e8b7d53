"""API Gateway's WebSocket API, locally: a real WebSocket server that invokes the route handlers the
template names ($connect, $disconnect, ``subscribe``, $default) with the events API Gateway sends,
and the ``@connections`` management API those handlers call through boto3 (post_to_connection).

It holds client input to API Gateway's rules: route selection on ``$request.body.action`` (anything
that does not name a route goes to $default), 128 KB messages in frames of at most 32 KB (close 1009),
no binary frames (close 1003), the stage's throttles (an error frame instead of the integration), and
API Gateway's own error frames when an integration fails. Bad input never ends in a 1011."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from spool.devstack.gateway import Buckets
from spool.devstack.runtime import DEFAULT_CONCURRENCY, LocalFunction
from spool.devstack.template import WebSocketThrottles

log = logging.getLogger("devstack.websocket")

MAX_MESSAGE_BYTES = 128 * 1024  # API Gateway's message payload limit ...
MAX_FRAME_BYTES = 32 * 1024  # ... sent in frames of at most this; either one over closes with 1009
ROUTE_KEY = "action"  # the template's RouteSelectionExpression, $request.body.action
LIFECYCLE_ROUTES = {"$connect", "$disconnect"}  # never chosen for a message
# Invocations waiting for a container, beyond those running, before the gateway itself makes callers
# wait: the runtime's own wait and throttle decide (as Lambda's concurrency does on AWS).
WAITING_PER_CONTAINER = 3


class WebSocketGateway:
    def __init__(
        self,
        routes: Mapping[str, LocalFunction],
        sock: socket.socket,
        *,
        stage: str,
        throttles: WebSocketThrottles | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = routes
        self._socket = sock
        address = sock.getsockname()
        # A TCP socket, or (in tests) a Unix one, whose address is a path.
        self._host, self._port = address[:2] if isinstance(address, tuple) else ("localhost", 0)
        self._stage = stage
        self._throttles = throttles or WebSocketThrottles()
        self._buckets = Buckets(clock)  # one per route, shared by every connection (as on a stage)
        self._connections: dict[str, ServerConnection] = {}
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="websocket-gateway", daemon=True)
        self._invocations: ThreadPoolExecutor | None = None  # made at start, for the routes it serves
        self.api_id = "wslocal"

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self._port}"

    def start(self) -> WebSocketGateway:
        # API Gateway bounds no route's integrations but by the function's concurrency. asyncio's
        # default executor would (min(32, CPUs + 4): 6 threads on 2 cores), and a burst of $connects
        # and subscribes, each holding a thread while it pushes, queued behind it for 0.4-0.7 s.
        # Sized here, not in __init__: the stack gives the gateway its routes once the functions exist.
        concurrency = sum(
            getattr(function, "max_concurrency", DEFAULT_CONCURRENCY)
            for function in {id(f): f for f in self._routes.values()}.values()
        )
        threads = max(DEFAULT_CONCURRENCY, concurrency) * (1 + WAITING_PER_CONTAINER)
        self._invocations = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="websocket-route")
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._server = await serve(
            self._session,
            sock=self._socket,
            process_request=self._connect,
            process_response=self._accepted,
            max_size=(MAX_MESSAGE_BYTES, MAX_FRAME_BYTES),
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self._invocations is not None:
            self._invocations.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ events
    def _event(self, route: str, connection_id: str, kind: str, **extra: Any) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "requestContext": {
                "routeKey": route,
                "eventType": kind,
                "connectionId": connection_id,
                "requestId": str(uuid.uuid4()),
                "domainName": f"{self._host}:{self._port}",
                "stage": self._stage,
                "apiId": self.api_id,
                "requestTimeEpoch": int(now.timestamp() * 1000),
            },
            "isBase64Encoded": False,
            **extra,
        }

    async def _invoke(self, route: str, event: dict[str, Any]) -> Any:
        """The route's integration; None when it failed (API Gateway: the route failed, the connection
        stays)."""
        function = self._routes.get(route)
        if function is None:
            return {"statusCode": 200}
        try:
            return await asyncio.get_running_loop().run_in_executor(self._invocations, function.invoke, event)
        except Exception as exc:  # the handler raised, its container died, it timed out
            log.error("%s: %s", route, exc)
            return None

    def _throttled(self, route: str) -> bool:
        throttle = self._throttles.for_route(route)
        return throttle is not None and self._buckets.take(route, throttle) > 0

    def _select_route(self, text: str) -> str | None:
        """API Gateway's route selection on ``$request.body.action``: the action of a JSON object when
        it is a string naming a message route; anything else (not JSON, JSON nested too deep to parse,
        no action, an action that is not a string or names no route) goes to $default. None: no
        route takes the message."""
        try:
            action = json.loads(text).get(ROUTE_KEY)
        except (ValueError, AttributeError, RecursionError):
            action = None
        if isinstance(action, str) and action in self._routes and action not in LIFECYCLE_ROUTES:
            return action
        return "$default" if "$default" in self._routes else None

    @staticmethod
    async def _error_frame(connection: ServerConnection, message: str, event: Mapping[str, Any]) -> None:
        """API Gateway's own error frame (not the function's, and not Spool's envelope: a deployed
        client receives exactly this)."""
        context = event["requestContext"]
        frame = {
            "message": message,
            "connectionId": context["connectionId"],
            "requestId": context["requestId"],
        }
        with contextlib.suppress(ConnectionClosed):
            await connection.send(json.dumps(frame))

    async def _connect(self, connection: ServerConnection, request: Request) -> Response | None:
        """$connect runs before the handshake completes: a non-2xx answer refuses the connection."""
        connection_id = secrets.token_hex(12)
        connection.connection_id = connection_id  # type: ignore[attr-defined]
        split = urlsplit(request.path)
        query = dict(parse_qsl(split.query))
        event = self._event(
            "$connect",
            connection_id,
            "CONNECT",
            headers=dict(request.headers.raw_items()),
            queryStringParameters=query or None,
        )
        own = {"X-Request-Id": event["requestContext"]["requestId"]}  # the gateway's own answers'
        if self._throttled("$connect"):  # refused before the integration runs
            return _http_response(
                HTTPStatus.TOO_MANY_REQUESTS, json.dumps({"message": "Too Many Requests"}), own
            )
        result = await self._invoke("$connect", event)
        if result is None:
            return _http_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, json.dumps({"message": "Internal server error"}), own
            )
        status = int((result or {}).get("statusCode", 200))
        headers = {str(k): str(v) for k, v in ((result or {}).get("headers") or {}).items()}
        if status >= 300:
            return _http_response(status, str((result or {}).get("body") or ""), headers)
        connection.handshake_headers = headers  # type: ignore[attr-defined]
        return None

    @staticmethod
    def _accepted(connection: ServerConnection, request: Request, response: Response) -> Response:
        """The 101 carries the headers $connect's integration answered with (API Gateway's does)."""
        for name, value in getattr(connection, "handshake_headers", {}).items():
            response.headers[name] = value
        return response

    async def _session(self, connection: ServerConnection) -> None:
        connection_id: str = connection.connection_id  # type: ignore[attr-defined]
        self._connections[connection_id] = connection
        try:
            async for message in connection:
                if isinstance(message, bytes):
                    # An API without binary media types takes text frames only: API Gateway closes.
                    await connection.close(CloseCode.UNSUPPORTED_DATA, "Binary frames are not supported")
                    break
                await self._message(connection, connection_id, message)
        except ConnectionClosed:
            pass
        finally:
            self._connections.pop(connection_id, None)
            await self._invoke("$disconnect", self._event("$disconnect", connection_id, "DISCONNECT"))

    async def _message(self, connection: ServerConnection, connection_id: str, text: str) -> None:
        route = self._select_route(text)
        event = self._event(route or "$default", connection_id, "MESSAGE", body=text)
        if route is None:  # no route matched and there is no $default
            await self._error_frame(connection, "Forbidden", event)
        elif self._throttled(route):
            await self._error_frame(connection, "Too Many Requests", event)
        elif await self._invoke(route, event) is None:
            await self._error_frame(connection, "Internal server error", event)

    # ------------------------------------------------------------------ @connections
    # API Gateway answers @connections at once: a message is taken (its delivery to the client is the
    # gateway's business), a connection that is closing is gone (410), a disconnect is under way. A
    # send to a closing connection waited here for its close (up to 10 s), and one to a client that
    # does not read waited for its buffer: the function's call timed out instead (3 s), and retried.
    ANSWER_WITHIN_SECONDS = 1.0

    def post(self, connection_id: str, data: bytes) -> bool:
        connection = self._connections.get(connection_id)
        if connection is None or connection.state is not State.OPEN:
            return False
        future: Future[None] = asyncio.run_coroutine_threadsafe(connection.send(data.decode()), self._loop)
        try:
            future.result(timeout=self.ANSWER_WITHIN_SECONDS)
        except ConnectionClosed:
            return False
        except TimeoutError:  # written, waiting for the client to read it: sent, in order, or gone
            return connection.state is State.OPEN
        return True

    def disconnect(self, connection_id: str) -> bool:
        connection = self._connections.get(connection_id)
        if connection is None:
            return False
        closing = asyncio.run_coroutine_threadsafe(connection.close(), self._loop)
        with contextlib.suppress(TimeoutError):  # the closing handshake goes on without the caller
            closing.result(timeout=self.ANSWER_WITHIN_SECONDS)
        return True

    def is_connected(self, connection_id: str) -> bool:
        return connection_id in self._connections


def _http_response(status: int, body: str, headers: Mapping[str, str] | None = None) -> Response:
    """An answer to the opening handshake that refuses the connection."""
    raw = body.encode()
    return Response(
        status,
        HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error",
        Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(raw))),
                *(headers or {}).items(),
            ]
        ),
        raw,
    )


class _ManagementHandler(BaseHTTPRequestHandler):
    server: ManagementApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def _connection_id(self) -> str | None:
        path = unquote(urlsplit(self.path).path)
        marker = "/@connections/"
        return path.split(marker, 1)[1] if marker in path else None

    def _answer(self, status: int, body: dict[str, Any] | None = None, error: str | None = None) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if error:
            self.send_header("x-amzn-ErrorType", error)
        self.send_header("Content-Length", str(len(raw)))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the caller gave up on it
            self.end_headers()
            self.wfile.write(raw)

    def do_POST(self) -> None:
        connection_id = self._connection_id()
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if connection_id and self.server.gateway.post(connection_id, data):
            self._answer(200)
        else:
            self._answer(410, {"message": "GoneException"}, "GoneException")

    def do_DELETE(self) -> None:
        connection_id = self._connection_id()
        if connection_id and self.server.gateway.disconnect(connection_id):
            self._answer(204)
        else:
            self._answer(410, {"message": "GoneException"}, "GoneException")

    def do_GET(self) -> None:
        connection_id = self._connection_id()
        if connection_id and self.server.gateway.is_connected(connection_id):
            self._answer(
                200, {"connectedAt": datetime.now(UTC).isoformat(), "identity": {"sourceIp": "127.0.0.1"}}
            )
        else:
            self._answer(410, {"message": "GoneException"}, "GoneException")


class ManagementApiServer(ThreadingHTTPServer):
    """The ``https://{api}.execute-api.{region}.amazonaws.com/{stage}/@connections/{id}`` endpoint."""

    daemon_threads = True

    def __init__(self, gateway: WebSocketGateway, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _ManagementHandler)
        self.gateway = gateway
