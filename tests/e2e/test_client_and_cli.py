"""The Python client and the CLI against the embedded stack, as a user runs them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool import Client
from spool.client import InvalidRequest, NotFound, read_directory
from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.support import ROOT


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


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C becomes SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_the_cli_streams_under_a_terminal_and_cancels_on_ctrl_c(
    dev_stack: RunningStack, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hello')\n")
    env = {
        **os.environ,
        "SPOOL_URL": dev_stack.base_url,
        "SPOOL_API_KEY": DEV_KEY,
        "SPOOL_CACHE_DIR": str(tmp_path / "cache"),
    }
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spool.cli",
            "ask",
            "Explain main.py",
            "--context",
            str(tmp_path / "src"),
            "--model",
            "sim-realtime",
            "--max-tokens",
            "3000",
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        cwd=ROOT,
        preexec_fn=_controlling_terminal,  # the child must own the terminal
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 30
    while b"tok/s" not in output and time.monotonic() < deadline:  # the status line under a terminal
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                output += os.read(leader, 4096)
            except OSError:  # the CLI exited: its output says why
                break
    assert process.poll() is None, output.decode(errors="replace")
    assert b"job job_" in output
    assert b"~$" in output  # the status line carries the cost so far
    os.write(leader, b"\x03")  # Ctrl-C, as a person types it: the terminal sends SIGINT
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # keep reading: a full terminal buffer would block the CLI's writes
        ready, _, _ = select.select([leader], [], [], 0.2)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the CLI closed the terminal (it exited)
            break
        output += chunk
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    os.close(leader)
    assert process.returncode == 130
    text = output.decode(errors="replace")
    assert "cancelled: cancelled" in text
    job_id = text.split("job ", 1)[1].split()[0]
    assert Client(dev_stack.base_url, DEV_KEY).job(job_id)["status"] == "cancelled"


def test_the_demo_drops_the_connection_and_resumes(dev_stack: RunningStack, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spool.cli",
            "demo",
            "--url",
            dev_stack.base_url,
            "--key",
            DEV_KEY,
            "--max-tokens",
            "80",
            "--drop-after",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "SPOOL_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "connection dropped after chunk 3; reconnecting with Last-Event-ID: 3" in result.stderr
    assert "completed:" in result.stderr
    assert len(result.stdout.split()) >= 60  # the whole answer was printed across the reconnect


def test_keys_and_limits_work_against_the_local_stack_with_no_flags(dev_stack: RunningStack) -> None:
    env = {**os.environ, "SPOOL_URL": dev_stack.base_url}

    def spool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "spool.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
        )

    created = spool("keys", "create", "--tenant", "cli-tenant")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert "the local stack" in created.stderr
    limited = spool(
        "limits",
        "set",
        "--tenant",
        "cli-tenant",
        "--tokens-per-minute",
        "1234",
        "--tokens-per-day",
        "99999",
        "--max-concurrent-jobs",
        "3",
    )
    assert limited.returncode == 0, limited.stderr
    status, headers, _ = dev_stack.request(
        "POST",
        "/v1/jobs",
        body={"message": "hi", "model": "sim-fast", "max_tokens": 5},
        key=key,
        headers={"Idempotency-Key": "cli-limits"},
    )
    assert status == 202
    assert headers["X-RateLimit-Limit-Tokens"] == "1234"  # the new key works, with the new limits
    nowhere = subprocess.run(
        [sys.executable, "-m", "spool.cli", "limits", "get", "--tenant", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "SPOOL_URL": "http://127.0.0.1:9"},
    )
    assert nowhere.returncode == 2
    assert "No local Spool stack answers at http://127.0.0.1:9" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr
