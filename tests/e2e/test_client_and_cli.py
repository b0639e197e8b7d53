"""The Python client against the embedded stack, as a user runs it (the CLI: tests/e2e/test_cli.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool import Client
from spool.client import InvalidRequest, NotFound, read_directory
from tests.e2e.conftest import DEV_KEY, RunningStack


@pytest.fixture
def client(dev_stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("SPOOL_CACHE_DIR", str(tmp_path / "cache"))
    return Client(dev_stack.base_url, DEV_KEY)


def test_a_directory_is_uploaded_then_updated_by_diff(client: Client, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.py").write_text("def handler():\n    return 1\n")
    (project / "src" / "util.py").write_text("X = 1\n")
    (project / "build").mkdir()
    (project / "build" / "out.py").write_text("generated = True\n")
    (project / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (project / ".gitignore").write_text("build/\n")
    assert set(read_directory(project)) == {".gitignore", "src/app.py", "src/util.py"}

    first = client.sync_directory(project)
    assert (first["version"], first["file_count"]) == (1, 3)
    assert first["skipped"] == [{"path": "logo.png", "reason": "binary"}]  # build/ is ignored, not skipped
    assert (first["changed"], first["uploaded_via"]) == (True, "direct")
    (project / "src" / "app.py").write_text("def handler():\n    return 2\n")
    (project / "src" / "util.py").unlink()
    second = client.sync_directory(project)
    assert second["context_id"] == first["context_id"]
    assert (second["version"], second["file_count"]) == (2, 2)
    assert (second["changed"], second["uploaded_via"]) == (True, "patch")
    files = {f["path"] for f in client.get_context(first["context_id"])["files"]}
    assert files == {".gitignore", "src/app.py"}


def test_errors_are_typed_with_code_details_and_suggestions(client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.get_context("ctx_nope")
    assert missing.value.code == "context_not_found"
    assert missing.value.suggestions
    with pytest.raises(InvalidRequest) as invalid:
        client.create_context([{"path": "../x", "content": "y"}])
    assert invalid.value.code == "invalid_path"
    assert invalid.value.details["path"] == "../x"


class FlakyProxy:
    """A TCP proxy to the stack that cuts the connections it is told to, mid-response."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.cut_next = 0
        self.cuts = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def kill_all(self) -> None:
        """Drop every open connection at once (a network failure under a live stream)."""
        self.cuts += 1
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._open += [downstream, upstream]
            threading.Thread(target=self._pipe, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.cut_next > 0:  # the next answer, on any (kept-alive) connection:
                    self.cut_next -= 1  # pass a little of it, then drop the connection
                    sink.sendall(data[:20])
                    self.cuts += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def proxy(dev_stack: RunningStack) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(int(dev_stack.base_url.rsplit(":", 1)[1]))
    yield flaky
    flaky.close()


def test_stream_survives_connections_killed_mid_answer(client: Client, proxy: FlakyProxy) -> None:
    direct = client
    through_proxy = Client(f"http://127.0.0.1:{proxy.port}", DEV_KEY, sleep=lambda _: None)
    job = direct.create_job("resume by yourself", model="sim-realtime", max_tokens=120)
    received: list[str] = []
    for index, text in enumerate(through_proxy.stream(job["job_id"], transport="poll")):
        received.append(text)
        if index in (1, 3):
            proxy.cut_next = 1  # the next long-poll dies mid-answer
    assert proxy.cuts >= 2
    final = direct.job(job["job_id"])
    assert "".join(received) == final["output"]  # nothing lost, nothing repeated
    assert final["status"] == "completed"


def test_the_sse_stream_survives_the_network_dropping_it_mid_answer(
    client: Client, proxy: FlakyProxy
) -> None:
    through_proxy = Client(f"http://127.0.0.1:{proxy.port}", DEV_KEY, sleep=lambda _: None)
    job = client.create_job("resume by yourself", model="sim-realtime", max_tokens=200)
    received: list[str] = []
    for index, text in enumerate(through_proxy.stream(job["job_id"])):  # SSE, the default transport
        received.append(text)
        if index in (1, 3):
            proxy.kill_all()  # every open connection dies under the live stream
    assert proxy.cuts >= 2
    final = client.job(job["job_id"])
    assert "".join(received) == final["output"]  # nothing lost, nothing repeated
    assert final["status"] == "completed"


def test_the_idempotency_key_is_reused_across_the_clients_own_retries(client: Client) -> None:
    job = client.create_job("once", model="sim-fast", max_tokens=5, idempotency_key="client-retry-1")
    again = client.create_job("once", model="sim-fast", max_tokens=5, idempotency_key="client-retry-1")
    assert again["job_id"] == job["job_id"]
