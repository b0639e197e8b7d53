"""moto's server as the embedded stack runs it: ``python -m spool.devstack.moto_server <fd>``.

It differs from ``python -m moto.server`` in these ways:

- **DynamoDB is linearizable.** moto handles requests on threads and its DynamoDB backend does not
  serialize them: concurrent conditional updates lose updates, and a failing TransactWriteItems
  restores a copy of the table taken before it started, erasing writes made meanwhile. Here every
  DynamoDB and DynamoDB Streams request runs under one lock, so each is one atomic step, as on AWS.
  SQS long polls and S3 transfers keep running concurrently.
- **It serves a socket the stack has already bound** (file descriptor ``fd``), so the stack knows its
  port before the server starts and a busy port is reported at once.
- **It keeps connections alive** (waitress instead of werkzeug's development server, which closes
  every connection) and writes no access log, and it remembers moto's list of service modules
  instead of listing its package directory on every request: together 2-3x less time per call.
- **Transactions cost what they touch** (``moto_patches``): moto copied whole tables for each one.
- **Stream readers can wait for a write** (``GET /_spool/stream-changes?after=N&timeout=S&table=T``):
  the answer is a counter of the stream records written so far to table ``T`` (or to any table),
  sent as soon as it passes ``after`` (or after ``timeout`` seconds). The stack's stream pollers wait
  on it instead of polling every 50 ms: an idle stack makes one request per poller every few seconds,
  a record is read as soon as it is written, and a write wakes only the poller of its table's stream.
- **It ends with its parent.**
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

SERIALIZED_TARGETS = ("DynamoDB_", "DynamoDBStreams_")
STREAM_CHANGES_PATH = "/_spool/stream-changes"
MAX_WAIT_SECONDS = 30.0

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class SerializedDynamoDB:
    """WSGI middleware: one DynamoDB request at a time, the whole request and response inside the lock."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if str(environ.get("HTTP_X_AMZ_TARGET", "")).startswith(SERIALIZED_TARGETS):
            with self._lock:
                return list(self._app(environ, start_response))
        return self._app(environ, start_response)


class StreamChanges:
    """Counters of the DynamoDB stream records written, per table and in all, and a wait for one to
    pass a value."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.counts: dict[str, int] = {}
        self.count = 0

    def record_written(self, table: str = "") -> None:
        with self._changed:
            self.count += 1
            self.counts[table] = self.counts.get(table, 0) + 1
            self._changed.notify_all()

    def wait(self, after: int, timeout: float, table: str | None = None) -> int:
        """The count (of ``table``'s records, or of all) once it passes ``after``, or at ``timeout``."""

        def now() -> int:
            return self.count if table is None else self.counts.get(table, 0)

        with self._changed:
            self._changed.wait_for(lambda: now() > after, timeout)
            return now()


class StreamChangesRoute:
    """WSGI middleware: ``GET /_spool/stream-changes?after=N&timeout=S[&table=T]`` answers the count
    of records written (to table ``T``, or to any) as soon as it passes ``N`` (or after ``S`` seconds,
    at most 30); every other request goes to ``app``."""

    def __init__(self, app: WsgiApp, changes: StreamChanges) -> None:
        self._app = app
        self._changes = changes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != STREAM_CHANGES_PATH:
            return self._app(environ, start_response)
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        try:
            after = int(query.get("after", ["-1"])[0])
            timeout = min(MAX_WAIT_SECONDS, max(0.0, float(query.get("timeout", ["0"])[0])))
        except ValueError:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"after must be an integer and timeout a number of seconds"]
        table = query.get("table", [None])[0]
        body = str(self._changes.wait(after, timeout, table)).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _remember_service_modules() -> None:
    """moto lists its package directory (a few hundred stat calls) on every request to map the
    request to a service; the list never changes while the server runs."""
    from moto import backends

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules


def _no_continue_without_a_body() -> None:
    """waitress answers ``Expect: 100-continue`` with ``100 Continue`` even when ``Content-Length``
    is 0, and then waits for a body that never comes: boto3's PutObject of an empty file (an empty
    ``__init__.py`` in a context) hung until the client timed out. No body, nothing to continue."""
    from waitress.parser import HTTPRequestParser

    parse_header = HTTPRequestParser.parse_header

    def parse_header_without_empty_continue(self: HTTPRequestParser, header_plus: bytes) -> None:
        parse_header(self, header_plus)
        if not self.chunked and self.content_length == 0:
            self.expect_continue = False

    HTTPRequestParser.parse_header = parse_header_without_empty_continue


def main(argv: list[str]) -> None:
    import waitress
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from spool.devstack import moto_patches

    sock = socket.socket(fileno=int(argv[0]))
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stack stops this server itself
    # Nothing to flush: end at once rather than wait for the threads of open requests (long polls).
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    _remember_service_modules()
    _no_continue_without_a_body()
    changes = StreamChanges()
    moto_patches.install(on_stream_record=changes.record_written)
    app = StreamChangesRoute(SerializedDynamoDB(DomainDispatcherApplication(create_backend_app)), changes)
    # Threads: every SQS long poll holds one for up to its wait time, so there are many.
    server = waitress.create_server(app, sockets=[sock], threads=64, connection_limit=1000, ident="moto")
    server.run()


if __name__ == "__main__":
    main(sys.argv[1:])
