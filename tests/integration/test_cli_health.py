"""`spool health` against a stack that accepts connections and never answers (hung, or a firewall
that swallows the reply): one attempt, bounded by --timeout, reported as an error (exit 2)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from spool.cli import main


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening socket nobody accepts on: the kernel completes each connection into its backlog,
    and no request is ever answered."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield listener


def _connections_made(listener: socket.socket) -> int:
    """The connections waiting in the backlog (closed ones too), taken without blocking."""
    listener.setblocking(False)
    made = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return made
        connection.close()
        made += 1


def test_health_of_a_stack_that_never_answers_is_one_bounded_attempt(
    silent_server: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
    code = main(["health", "--url", url, "--key", "sk-x", "--timeout", "1"])
    out, err = capsys.readouterr()
    assert code == 2  # it could not be asked: an error, not "unhealthy" (1)
    assert out == ""
    assert err.startswith(f"error: Could not reach Spool at {url}: no answer within 1 s")
    # It was there, and hung: not "is the stack running? start it" (a person went looking for a
    # stack that was running).
    assert "make dev" not in err and "did not answer" in err
    assert _connections_made(silent_server) == 1  # no retries: --timeout bounds the whole check
