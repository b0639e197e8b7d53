"""`spool health` against a stack that accepts connections and never answers (hung, or a firewall
that swallows the reply): one attempt, bounded by --timeout, reported as an error (exit 2)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from spool.cli import main


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts connections and never answers: its URL and what it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for connection in accepted:
        connection.close()


def test_health_of_a_stack_that_never_answers_is_one_bounded_attempt(
    silent_server: tuple[str, list[socket.socket]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, accepted = silent_server
    code = main(["health", "--url", url, "--key", "sk-x", "--timeout", "1"])
    out, err = capsys.readouterr()
    assert code == 2  # it could not be asked: an error, not "unhealthy" (1)
    assert out == ""
    assert err.startswith(f"error: Could not reach Spool at {url}")
    assert len(accepted) == 1  # no retries: --timeout bounds the whole check
