"""The emulator's HTTP side, driven over a socket pair: whatever a client sends (an unknown method, a
malformed request line, a Content-Length it never fills), the answer is API Gateway's, in Spool's
envelope with X-Request-Id, and no connection holds a server thread."""

from __future__ import annotations

import functools
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from spool.devstack.gateway import RestApiEmulator, _RequestHandler
from spool.devstack.template import Template
from tests.fakes import FakeFunction
from tests.support import ROOT

SHORT = 0.2  # the read timeout of these tests: a stalled request is answered after this long


def allow(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "principalId": "key_1",
        "policyDocument": {
            "Statement": [{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": "*"}],
        },
        "context": {"tenant_id": "acme"},
        "usageIdentifierKey": "usage_1",
    }


def echo(event: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "body": json.dumps({"method": event["httpMethod"], "body": event["body"]})}


@functools.cache
def project_template() -> Template:
    return Template.load(ROOT / "template.yaml")  # read once: these tests do not change it


@pytest.fixture
def functions() -> dict[str, FakeFunction]:
    return {
        name: FakeFunction(allow if name == "AuthorizerFunction" else echo)
        for name in project_template().functions()
    }


@pytest.fixture
def emulator(functions: dict[str, FakeFunction]) -> RestApiEmulator:
    return RestApiEmulator(project_template(), "SpoolApi", functions, region="us-east-1", stage="prod")  # type: ignore[arg-type]


class Connection:
    """One client connection to the gateway's request handler, which runs in its own thread. The
    handler starts once the first bytes are sent (or on ``start``), so a short read timeout never
    runs out before a slow test thread has sent its request."""

    def __init__(self, emulator: RestApiEmulator, read_timeout: float) -> None:
        self.client, served = socket.socketpair()
        self.client.settimeout(30)  # a safety net only: every answer below comes long before
        self.server = server = SimpleNamespace(
            emulator=emulator, read_timeout=read_timeout, server_address=("127.0.0.1", 8000), closing=False
        )

        def serve() -> None:
            try:
                _RequestHandler(served, ("127.0.0.1", 40000), server)  # type: ignore[arg-type]
            finally:
                served.close()

        self.thread = threading.Thread(target=serve, daemon=True)

    def start(self) -> None:
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()

    def send(self, data: bytes) -> None:
        self.client.sendall(data)
        self.start()

    def response(self, method: str = "GET") -> tuple[int, http.client.HTTPMessage, Any]:
        answer = http.client.HTTPResponse(self.client, method=method)  # type: ignore[arg-type]
        answer.begin()
        raw = answer.read()
        return answer.status, answer.headers, json.loads(raw) if raw else None

    def closed_by_server(self) -> bool:
        return self.client.recv(1) == b""

    def finished(self) -> bool:
        """The handler's thread ended (the connection was given up, not held)."""
        self.client.close()
        self.thread.join(timeout=30)
        return self.thread.ident is not None and not self.thread.is_alive()


@pytest.fixture
def connect(emulator: RestApiEmulator) -> Iterator[Any]:
    opened: list[Connection] = []

    def open_connection(read_timeout: float = 10.0) -> Connection:
        opened.append(Connection(emulator, read_timeout))
        return opened[-1]

    yield open_connection
    for connection in opened:
        connection.client.close()


def assert_envelope(
    status: int, headers: http.client.HTTPMessage, body: Any, expected: int, code: str
) -> None:
    assert status == expected
    assert headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == headers["X-Request-Id"]
    assert body["error"]["suggestions"]
    # the fields OpenAI's SDKs read beside code (error.type, error.param): these answers reach them too
    assert body["error"]["type"].endswith("_error") and body["error"]["param"] is None


# ---------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "get", "TRACE", "CONNECT"])
def test_a_method_api_gateway_has_not_is_the_templates_404(
    connect: Any, functions: dict[str, FakeFunction], method: str
) -> None:
    connection = connect()
    connection.send(f"{method} /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    assert_envelope(*connection.response(), 404, "not_found")
    assert all(not f.events for f in functions.values())  # neither the authorizer nor a function


def test_api_gateways_methods_reach_the_function(connect: Any) -> None:
    connection = connect()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):  # (OPTIONS is the preflight)
        connection.send(f"{method} /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        status, _, body = connection.response(method)
        assert status == 200
        if method != "HEAD":
            assert body["method"] == method


def test_a_request_whose_client_went_away_still_has_its_log_line(
    connect: Any, functions: dict[str, FakeFunction], caplog: pytest.LogCaptureFixture
) -> None:
    """What it did was done (a context created), but the line was lost with the answer: a request the
    log never showed."""
    gone = threading.Event()

    def slow(event: dict[str, Any]) -> dict[str, Any]:
        gone.wait(timeout=30)  # the client leaves before the answer
        return {"statusCode": 201, "body": "{}"}

    functions["ContextsFunction"].behaviour = slow
    connection = connect()
    with caplog.at_level("INFO", logger="devstack.gateway"):
        connection.send(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        connection.client.close()
        gone.set()
        connection.thread.join(timeout=30)
    assert any(
        "POST /v1/contexts 201" in r.getMessage() and "(client went away)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------- the stack stopping
def test_a_stopping_stack_leaves_requests_on_kept_alive_connections_unanswered(
    connect: Any, functions: dict[str, FakeFunction]
) -> None:
    """An outside tester stopped the stack under a kept-alive connection: its next requests got 500
    "The authorizer failed" (the functions were stopping), and a browser's EventSource, which gives
    up for good on any answer but a stream, never came back. A closed connection is what a gateway
    going away gives, and what clients retry."""
    connection = connect()
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    connection.send(request)
    assert connection.response()[0] == 200
    invoked = sum(len(f.events) for f in functions.values())
    connection.server.closing = True
    connection.send(request)
    assert connection.closed_by_server()
    assert sum(len(f.events) for f in functions.values()) == invoked  # nothing reached a function
    assert connection.finished()


def test_an_error_from_a_function_the_stop_ended_is_not_answered(
    connect: Any, functions: dict[str, FakeFunction]
) -> None:
    connection = connect()

    def stopped_under_it(event: dict[str, Any]) -> dict[str, Any]:
        connection.server.closing = True  # the stack began to stop while the request ran
        raise RuntimeError("the container was stopped")

    functions["AuthorizerFunction"].behaviour = stopped_under_it
    connection.send(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n")
    assert connection.closed_by_server()
    assert connection.finished()


# ---------------------------------------------------------------------- malformed requests
@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GARBAGE\r\n", 400),
        (b"GET /v1/health HTTP/1.1 extra\r\n", 400),
        (b"GET /v1/health HTTX/1.1\r\n", 400),
        (b"GET /v1/health HTTP/2.0\r\n", 505),
        (b"GET /v1/health\r\n", 400),  # HTTP/0.9
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n", 414),
    ],
)
def test_a_malformed_request_line_gets_an_envelope(connect: Any, request_line: bytes, status: int) -> None:
    connection = connect()
    connection.send(request_line + b"Host: x\r\n\r\n")
    response = connection.response()
    assert_envelope(*response, status, "invalid_request")
    assert connection.closed_by_server()
    assert connection.finished()


def test_too_many_or_too_long_headers_get_431(connect: Any) -> None:
    many = connect()
    many.send(b"GET /v1/health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
    assert_envelope(*many.response(), 431, "invalid_request")
    long = connect()
    long.send(b"GET /v1/health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n")
    assert_envelope(*long.response(), 431, "invalid_request")


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "", "+5", "0x10"])
def test_a_content_length_that_is_not_a_number_of_bytes_is_400(connect: Any, length: str) -> None:
    connection = connect()
    connection.send(f"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
    status, headers, body = connection.response()
    assert_envelope(status, headers, body, 400, "invalid_request")
    assert "Content-Length" in body["error"]["message"]
    assert headers["Connection"] == "close"
    assert connection.finished()


def test_two_different_content_lengths_are_400(connect: Any) -> None:
    connection = connect()
    connection.send(b"POST /v1/health HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
    assert_envelope(*connection.response(), 400, "invalid_request")


@pytest.mark.parametrize("length", [10 * 1024 * 1024 + 1, 10**30])
def test_a_length_over_the_payload_limit_is_413_before_any_body_is_read(connect: Any, length: int) -> None:
    connection = connect(read_timeout=10.0)
    connection.send(f"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    # No body is sent: the answer comes at once, and not after a read timeout.
    status, headers, body = connection.response()
    assert_envelope(status, headers, body, 413, "payload_too_large")
    assert body["error"]["details"]["limit_bytes"] > 0
    assert connection.finished()


def test_expect_100_continue_is_refused_without_inviting_a_body_too_large(connect: Any) -> None:
    connection = connect()
    connection.send(b"PUT /v1/health HTTP/1.1\r\nContent-Length: 20000000\r\nExpect: 100-continue\r\n\r\n")
    assert_envelope(*connection.response(), 413, "payload_too_large")  # not 100 Continue first


def test_expect_100_continue_invites_an_acceptable_body(connect: Any) -> None:
    connection = connect()
    connection.send(b"PUT /v1/health HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += connection.client.recv(1)
    assert interim.startswith(b"HTTP/1.1 100")
    connection.send(b"{}")
    status, _, body = connection.response()
    assert (status, body["body"]) == (200, "{}")


def test_a_body_that_ends_early_is_400(connect: Any) -> None:
    connection = connect()
    connection.send(b"POST /v1/health HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")
    connection.client.shutdown(socket.SHUT_WR)
    assert_envelope(*connection.response(), 400, "invalid_request")
    assert connection.finished()


# ---------------------------------------------------------------------- chunked bodies
def test_a_chunked_body_reaches_the_function(connect: Any) -> None:
    connection = connect()
    connection.send(
        b"POST /v1/health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    status, _, body = connection.response()
    assert (status, body["body"]) == (200, '{"a": 1}')


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\nab\r\n0\r\n\r\n", b"2\r\nabc\r\n0\r\n\r\n", b"-1\r\n"],
)
def test_a_malformed_chunked_body_is_400(connect: Any, chunks: bytes) -> None:
    connection = connect()
    connection.send(b"POST /v1/health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert_envelope(*connection.response(), 400, "invalid_request")


def test_a_chunked_body_over_the_limit_is_413(connect: Any) -> None:
    connection = connect()
    connection.send(b"POST /v1/health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nA00001\r\n")
    assert_envelope(*connection.response(), 413, "payload_too_large")


def test_a_transfer_encoding_without_chunked_is_400(connect: Any) -> None:
    connection = connect()
    connection.send(b"POST /v1/health HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert_envelope(*connection.response(), 400, "invalid_request")


# ---------------------------------------------------------------------- clients that stop sending
def test_a_body_that_stops_arriving_is_408_and_the_thread_moves_on(
    connect: Any, functions: dict[str, FakeFunction]
) -> None:
    connection = connect(read_timeout=SHORT)
    connection.send(b"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    status, headers, body = connection.response()  # the client keeps its side open, sending nothing
    assert_envelope(status, headers, body, 408, "invalid_request")
    assert headers["Connection"] == "close"
    assert connection.closed_by_server()
    assert connection.finished()
    assert functions["HealthFunction"].events == []


def test_headers_that_stop_arriving_are_408(connect: Any) -> None:
    connection = connect(read_timeout=SHORT)
    connection.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    assert_envelope(*connection.response(), 408, "invalid_request")
    assert connection.finished()


def test_an_idle_connection_is_closed_quietly(connect: Any) -> None:
    connection = connect(read_timeout=SHORT)
    connection.start()
    assert connection.closed_by_server()  # nothing was asked, so nothing is answered
    assert connection.finished()


def test_a_kept_alive_connection_serves_one_request_after_another(connect: Any) -> None:
    connection = connect()
    for _ in range(3):
        connection.send(b"POST /v1/health HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        status, headers, _ = connection.response()
        assert status == 200
        assert headers["Connection"] is None  # kept open
    connection.send(b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert connection.response()[0] == 200
    assert connection.closed_by_server()
    assert connection.finished()


# ---------------------------------------------------------------------- straight to the emulator
def test_unknown_methods_and_the_http_layers_refusals_name_an_allowed_origin(
    emulator: RestApiEmulator,
) -> None:
    response = emulator.handle("PROPFIND", "/v1/health", {"Origin": "https://app.example.com"}, b"")
    assert response.status == 404
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    refused = emulator.refuse(408, "slow", {"Origin": "https://app.example.com"})
    assert refused.status == 408
    assert json.loads(refused.body)["error"]["message"] == "slow"
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
