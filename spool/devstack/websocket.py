"""API Gateway's WebSocket API, locally: a real WebSocket server that invokes the route handlers the
template names ($connect, $disconnect, ``subscribe``, $default) with the events API Gateway sends,
and the ``@connections`` management API those handlers call through boto3 (post_to_connection)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from spool.devstack.runtime import InvocationError, LocalFunction

log = logging.getLogger("devstack.websocket")


class WebSocketGateway:
    def __init__(self, routes: Mapping[str, LocalFunction], sock: socket.socket, *, stage: str) -> None:
        self._routes = routes
        self._socket = sock
        self._host, self._port = sock.getsockname()[:2]
        self._stage = stage
        self._connections: dict[str, ServerConnection] = {}
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="websocket-gateway", daemon=True)
        self.api_id = "wslocal"

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self._port}"

    def start(self) -> WebSocketGateway:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._server = await serve(self._session, sock=self._socket, process_request=self._connect)

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

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
        function = self._routes.get(route) or self._routes.get("$default")
        if function is None:
            return {"statusCode": 200}
        try:
            return await asyncio.get_running_loop().run_in_executor(None, function.invoke, event)
        except InvocationError as exc:  # as API Gateway: the route failed, the connection stays
            log.error("%s: %s", route, exc)
            return {"statusCode": 500}

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
        result = await self._invoke("$connect", event)
        status = int((result or {}).get("statusCode", 200))
        if status >= 300:
            body = str((result or {}).get("body") or "").encode()
            return Response(
                status,
                HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error",
                Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]),
                body,
            )
        return None

    async def _session(self, connection: ServerConnection) -> None:
        connection_id: str = connection.connection_id  # type: ignore[attr-defined]
        self._connections[connection_id] = connection
        try:
            async for message in connection:
                text = message if isinstance(message, str) else message.decode()
                try:
                    action = json.loads(text).get("action")
                except (ValueError, AttributeError):
                    action = None
                route = action if isinstance(action, str) and action in self._routes else "$default"
                await self._invoke(route, self._event(route, connection_id, "MESSAGE", body=text))
        except ConnectionClosed:
            pass
        finally:
            self._connections.pop(connection_id, None)
            await self._invoke("$disconnect", self._event("$disconnect", connection_id, "DISCONNECT"))

    # ------------------------------------------------------------------ @connections
    def post(self, connection_id: str, data: bytes) -> bool:
        connection = self._connections.get(connection_id)
        if connection is None:
            return False
        future: Future[None] = asyncio.run_coroutine_threadsafe(connection.send(data.decode()), self._loop)
        try:
            future.result(timeout=10)
        except ConnectionClosed:
            return False
        return True

    def disconnect(self, connection_id: str) -> bool:
        connection = self._connections.get(connection_id)
        if connection is None:
            return False
        asyncio.run_coroutine_threadsafe(connection.close(), self._loop).result(timeout=10)
        return True

    def is_connected(self, connection_id: str) -> bool:
        return connection_id in self._connections


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
