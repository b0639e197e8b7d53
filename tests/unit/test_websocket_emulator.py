"""The WebSocket emulator holds client input to API Gateway's rules: route selection that sends
anything it cannot route to $default (never a 1011), API Gateway's size limits and binary-frame close
codes, its own error frames, and the stage's throttles. Served on a Unix socket (no network)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, unix_connect

from spool.devstack.runtime import InvocationTimeout
from spool.devstack.template import Throttle, WebSocketThrottles
from spool.devstack.websocket import WebSocketGateway
from tests.fakes import FakeFunction
from tests.support import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stage:
    """A WebSocket gateway whose routes all go to one fake function (as the template's one
    integration does). The function acknowledges each message through @connections, so a client
    knows it was handled; ``fail`` makes it fail instead."""

    def __init__(self, path: Path, throttles: WebSocketThrottles | None, routes: tuple[str, ...]) -> None:
        self.clock = Clock()
        self.fail = False
        self.refuse = False  # $connect answers 401
        self.hold: threading.Barrier | None = None  # messages wait here for one another
        self.function = FakeFunction(self._handle)
        self.path = path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        self.gateway = WebSocketGateway({}, listener, stage="prod", throttles=throttles, clock=self.clock)
        # routed after it is made and before it starts, as the stack does (its functions come later)
        self.gateway._routes = dict.fromkeys(routes, self.function)  # type: ignore[assignment]
        self.gateway.start()

    def _handle(self, event: dict[str, Any]) -> dict[str, Any]:
        context = event["requestContext"]
        if context["eventType"] == "MESSAGE":
            if self.fail:
                raise InvocationTimeout("the function timed out")
            if self.hold is not None:
                self.hold.wait()
            ack = {"route": context["routeKey"], "size": len(event["body"])}
            self.gateway.post(context["connectionId"], json.dumps(ack).encode())
        if context["eventType"] == "CONNECT":
            status = 401 if self.refuse else 200
            return {"statusCode": status, "headers": {"X-Request-Id": context["requestId"]}, "body": "{}"}
        return {"statusCode": 200}

    def connect(self) -> ClientConnection:
        # No compression, so frame sizes on the wire are the sizes sent.
        return unix_connect(str(self.path), "ws://localhost/?api_key=k", compression=None, max_size=None)

    def routes_seen(self) -> list[str]:
        return [e["requestContext"]["routeKey"] for e in self.function.events]


@pytest.fixture
def stage() -> Iterator[Callable[..., Stage]]:
    folder = Path(tempfile.mkdtemp(prefix="ws", dir="/tmp"))  # a short path: Unix sockets allow ~100 bytes
    stages: list[Stage] = []

    def make(
        throttles: WebSocketThrottles | None = None,
        routes: tuple[str, ...] = ("$connect", "$disconnect", "subscribe", "$default"),
    ) -> Stage:
        stages.append(Stage(folder / f"s{len(stages)}", throttles, routes))
        return stages[-1]

    yield make
    for made in stages:
        made.gateway.stop()
    shutil.rmtree(folder, ignore_errors=True)


def receive(client: ClientConnection) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(client.recv(timeout=30))
    return answer


def close_code(client: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        client.recv(timeout=30)
    return closed.value.rcvd.code if closed.value.rcvd else None


def close_code_of_sending(client: ClientConnection, message: str | list[str]) -> int | None:
    """Send ``message``, which the gateway refuses: the code it closes with. The close may arrive
    while the client is still sending a fragmented message's last frames (then the send fails)."""
    try:
        client.send(message)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    return close_code(client)


DEEP = "[" * 5000 + "]" * 5000
UNROUTABLE = [
    '{"action": {}}',
    '{"action": 5}',
    '{"action": null}',
    '{"action": "nope"}',
    '{"action": "$connect"}',
    '{"action": "$disconnect"}',
    '{"no_action": 1}',
    "[1, 2]",
    '"a string"',
    "not json at all",
    "",
    '{"action": "subscribe"',  # cut short
    DEEP,
    '{"action": "subscribe", "x": ' + DEEP + "}",
]


def test_messages_that_name_no_route_go_to_default_and_the_connection_stays(
    stage: Callable[..., Stage],
) -> None:
    served = stage()
    with served.connect() as client:
        for text in UNROUTABLE:
            client.send(text)
            assert receive(client) == {"route": "$default", "size": len(text)}
        client.send('{"action": "subscribe", "job_id": "job_1"}')
        assert receive(client)["route"] == "subscribe"
    messages = [route for route in served.routes_seen() if route not in {"$connect", "$disconnect"}]
    assert messages == ["$default"] * len(UNROUTABLE) + ["subscribe"]


def test_a_binary_frame_closes_with_1003_as_api_gateway_does(stage: Callable[..., Stage]) -> None:
    served = stage()
    with served.connect() as client:
        client.send(b"\x00\x01binary")
        assert close_code(client) == 1003
    served.gateway.stop()  # waits for the connection's end, $disconnect included
    assert served.routes_seen() == ["$connect", "$disconnect"]


def test_messages_over_128_kb_or_frames_over_32_kb_close_with_1009(stage: Callable[..., Stage]) -> None:
    served = stage()
    with served.connect() as client:
        # 100 KB in frames of 25 KB is within both limits.
        client.send(["a" * 25_000 for _ in range(4)])
        assert receive(client) == {"route": "$default", "size": 100_000}
        client.send("a" * (32 * 1024))  # one frame of exactly 32 KB
        assert receive(client)["size"] == 32 * 1024
        assert close_code_of_sending(client, "a" * (32 * 1024 + 1)) == 1009
    with served.connect() as client:
        assert (
            close_code_of_sending(client, ["a" * 30_000 for _ in range(5)]) == 1009
        )  # 150 KB in small frames


def test_a_burst_of_messages_is_not_queued_behind_the_gateways_threads(stage: Callable[..., Stage]) -> None:
    """API Gateway bounds a route's integrations only by the function's concurrency: 40 subscribes
    that each wait until all 40 are running all go through (asyncio's default executor ran at most
    32, 6 on two cores, and the rest waited behind them)."""
    served = stage()
    clients = 40
    served.hold = threading.Barrier(clients, timeout=60)
    with contextlib.ExitStack() as open_:
        connections = [open_.enter_context(served.connect()) for _ in range(clients)]
        for client in connections:
            client.send('{"action": "subscribe"}')
        assert [receive(client) for client in connections] == [{"route": "subscribe", "size": 23}] * clients


def test_connections_answers_at_once_for_a_connection_that_is_closing(
    stage: Callable[..., Stage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """API Gateway answers @connections at once: a disconnect is under way, and a message for a
    closing connection is gone (410). Each waited for the client's side of the close (up to its close
    timeout): the function's call timed out (3 s) and botocore sent it again (an outside tester's
    client that stopped reading, and a ReadTimeoutError in the subscribe function)."""
    monkeypatch.setattr(WebSocketGateway, "ANSWER_WITHIN_SECONDS", 0.2)
    served = stage()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # a client that never answers a close
        raw.connect(str(served.path))
        raw.sendall(
            b"GET /?api_key=k HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101")
        connection_id = served.function.events[0]["requestContext"]["connectionId"]
        wait_for(lambda: connection_id in served.gateway._connections, what="the connection to be open")
        served.gateway._connections[connection_id].close_timeout = 600  # its close never completes
        assert served.gateway.post(connection_id, b'{"n": 1}') is True
        assert served.gateway.disconnect(connection_id) is True
        assert served.gateway.post(connection_id, b'{"n": 2}') is False


def test_a_failing_integration_answers_api_gateways_error_frame(stage: Callable[..., Stage]) -> None:
    served = stage()
    with served.connect() as client:
        served.fail = True
        client.send('{"action": "subscribe"}')
        error = receive(client)
        assert error["message"] == "Internal server error"
        assert error["connectionId"] and error["requestId"]
        served.fail = False
        client.send("still open?")
        assert receive(client)["route"] == "$default"


def test_without_a_default_route_an_unroutable_message_is_forbidden(stage: Callable[..., Stage]) -> None:
    served = stage(routes=("$connect", "$disconnect", "subscribe"))
    with served.connect() as client:
        client.send("hello")
        assert receive(client)["message"] == "Forbidden"
        client.send('{"action": "subscribe"}')
        assert receive(client)["route"] == "subscribe"


def test_messages_over_the_route_throttle_get_an_error_frame_without_the_integration(
    stage: Callable[..., Stage],
) -> None:
    served = stage(WebSocketThrottles(default=Throttle(rate=1.0, burst=2)))
    with served.connect() as client:
        for _ in range(2):
            client.send("x")
            assert receive(client)["route"] == "$default"
        client.send("x")
        throttled = receive(client)
        assert throttled["message"] == "Too Many Requests"
        assert throttled["connectionId"] and throttled["requestId"]
        client.send('{"action": "subscribe"}')  # another route, another bucket
        assert receive(client)["route"] == "subscribe"
        served.clock.now += 1.0
        client.send("x")
        assert receive(client)["route"] == "$default"
    assert served.routes_seen().count("$default") == 3


def test_the_handshake_carries_the_connect_integrations_headers_accepted_or_refused(
    stage: Callable[..., Stage],
) -> None:
    """Every response carries X-Request-Id (DESIGN.md): the handshake's too, as $connect answers it."""
    served = stage()
    with served.connect() as client:
        assert client.response is not None and client.response.status_code == 101
        assert (
            client.response.headers["X-Request-Id"]
            == served.function.events[-1]["requestContext"]["requestId"]
        )
    served.refuse = True
    with pytest.raises(InvalidStatus) as refused:
        served.connect()
    assert refused.value.response.status_code == 401
    request_id = served.function.events[-1]["requestContext"]["requestId"]
    assert refused.value.response.headers["X-Request-Id"] == request_id


def test_a_throttled_connect_is_refused_with_429(stage: Callable[..., Stage]) -> None:
    served = stage(WebSocketThrottles(routes={"$connect": Throttle(rate=1.0, burst=1)}))
    with served.connect() as client:
        client.send("x")
        assert receive(client)["route"] == "$default"
    with pytest.raises(InvalidStatus) as refused:
        served.connect()
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body or b"{}") == {"message": "Too Many Requests"}
    assert refused.value.response.headers["X-Request-Id"]  # the gateway's own answer names itself too
    served.clock.now += 1.0
    with served.connect() as client:
        client.send("x")
        assert receive(client)["route"] == "$default"
