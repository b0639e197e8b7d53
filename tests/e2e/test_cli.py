"""The `spool` CLI against the embedded stack, as a person runs it: under a terminal (a pty, read back
through a terminal emulator) and piped. The answer is on screen and in the byte stream exactly once,
the status line never inside it; completed, failed and Ctrl-C-cancelled jobs each end with their own
message and cost; errors are one line; the read-only commands print tables and JSON."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spool import Client
from tests.e2e.conftest import DEV_KEY, RunningStack, start_stack, stop_stack
from tests.support import ROOT
from tests.terminal import answer_in, screen_of

COLUMNS, ROWS = 80, 400
FATAL = json.dumps({"simulate": {"fault": "fatal", "at_token": 60}})


def cli_env(base_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES", "NO_COLOR", "TERM"}}
    return {
        **env,
        "SPOOL_URL": base_url,
        "SPOOL_API_KEY": DEV_KEY,
        "SPOOL_CACHE_DIR": str(tmp_path / "cache"),
        "TERM": "xterm-256color",  # what a terminal sets
    }


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C becomes SIGINT,
    with SIGINT's default action as a shell gives a program it runs in the foreground (a test run in
    the background, ``make test &``, inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`spool ARGS` with a pty of COLUMNS x ROWS as its stdin, stdout and stderr; everything it
    writes is kept in ``output`` (the terminal's output processing turns ``\\n`` into ``\\r\\n``)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spool.cli", *args],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env=env,
            cwd=ROOT,
            preexec_fn=_controlling_terminal,  # the child must own the terminal
        )
        os.close(follower)
        self.output = b""
        self.closed = False

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def read_until(self, done: Callable[[str], bool], timeout: float) -> bool:
        """Read (a full pty buffer would block the CLI) until ``done(text)``, the CLI closes the
        terminal, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not done(self.text) and not self.closed and time.monotonic() < deadline:
            ready, _, _ = select.select([self.leader], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # EIO: the CLI exited and closed the terminal
                chunk = b""
            if not chunk:
                self.closed = True
            self.output += chunk
        return done(self.text)

    def finish(self, timeout: float = 120) -> int:
        self.read_until(lambda _: False, timeout)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        finally:
            os.close(self.leader)
        return code

    def screen(self) -> list[str]:
        return screen_of(self.text, COLUMNS, ROWS)


def job_id_in(text: str) -> str:
    found = re.search(r"job (job_[a-z0-9]+) on ", text)
    assert found, text
    return found.group(1)


def squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def env(dev_stack: RunningStack, tmp_path: Path) -> dict[str, str]:
    return cli_env(dev_stack.base_url, tmp_path)


@pytest.fixture
def client(dev_stack: RunningStack) -> Iterator[Client]:
    with Client(dev_stack.base_url, DEV_KEY) as spool:
        yield spool


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "main.py").write_text("print('hello')\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return root


def spool(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spool.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


# ------------------------------------------------------------------------------------------- ask
def test_ask_under_a_terminal_shows_the_answer_once_untouched_by_the_status_line(
    env: dict[str, str], client: Client, project: Path
) -> None:
    terminal = Terminal(
        [
            "ask",
            "Explain main.py",
            "--context",
            str(project),
            "--model",
            "sim-realtime",
            "--max-tokens",
            "400",
        ],
        env,
    )
    assert terminal.finish() == 0, terminal.text
    text = terminal.text
    job = client.job(job_id_in(text))
    answer = job["output"]
    assert job["status"] == "completed" and len(answer) > 1000
    assert "tok/s" in text and "~$" in text  # the status line was drawn while the answer streamed
    # The byte stream, less escape sequences and the status line's own drawings: the answer once, whole.
    assert answer_in(text).count(answer) == 1
    screen = terminal.screen()
    assert not any("~$" in row or re.search("[\u2800-\u28ff]", row) for row in screen)  # no status left
    assert squeezed(answer) in squeezed("".join(screen))  # every row of the answer, in order, intact
    assert "skipped 1 file: logo.png (binary)" in screen
    (ending,) = [line for line in answer_in(text).splitlines() if line.startswith("completed:")]
    usage = job["usage"]
    assert f"{usage['input_tokens']:,} tokens in, {usage['output_tokens']:,} out" in ending
    assert f"${job['cost_usd']:.6f}" in ending


def test_ask_piped_prints_only_the_answer_on_stdout(env: dict[str, str], client: Client) -> None:
    done = spool(env, "ask", "Explain", "--model", "sim-fast", "--max-tokens", "120")
    assert done.returncode == 0, done.stderr
    job = client.job(job_id_in(done.stderr))
    assert done.stdout == job["output"] + "\n"  # no status line, no escape codes
    assert "~$" not in done.stderr and "\x1b" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"completed: {job['usage']['input_tokens']:,} tokens in")
    assert f"${job['cost_usd']:.6f}" in done.stderr


def test_a_failed_job_ends_with_its_error_suggestion_and_cost(env: dict[str, str], client: Client) -> None:
    terminal = Terminal(
        ["ask", "fail", "--model", "sim-realtime", "--max-tokens", "300", "--metadata", FATAL], env
    )
    assert terminal.finish() == 1, terminal.text
    job = client.job(job_id_in(terminal.text))
    assert job["status"] == "failed"
    assert answer_in(terminal.text).count(job["output"]) == 1  # the partial answer, once
    lines = answer_in(terminal.text).splitlines()
    failed = lines.index(f"failed: provider_error: {job['error']['message']}")
    assert lines[failed + 1].startswith("  - ")  # the suggestions
    assert any(
        line.startswith(f"  {job['usage']['input_tokens']:,} tokens in") and f"${job['cost_usd']:.6f}" in line
        for line in lines[failed:]
    )
    assert "completed:" not in terminal.text and "cancelled:" not in terminal.text


def test_ctrl_c_cancels_the_job_and_ends_with_its_tokens_and_cost(
    env: dict[str, str], client: Client, project: Path
) -> None:
    terminal = Terminal(
        [
            "ask",
            "Explain main.py",
            "--context",
            str(project),
            "--model",
            "sim-realtime",
            "--max-tokens",
            "3000",
        ],
        env,
    )
    assert terminal.read_until(lambda text: "tok/s" in text, timeout=60), terminal.text
    assert terminal.process.poll() is None
    os.write(terminal.leader, b"\x03")  # Ctrl-C, as a person types it: the terminal sends SIGINT
    assert terminal.finish() == 130, terminal.text
    job = client.job(job_id_in(terminal.text), output=False)
    assert job["status"] == "cancelled"
    (ending,) = [line for line in answer_in(terminal.text).splitlines() if line.startswith("cancelled:")]
    assert f"stopped after {job['progress']['tokens_generated']:,} tokens" in ending
    assert f"${job['cost_usd']:.6f}" in ending
    assert "completed:" not in terminal.text and "failed:" not in terminal.text


def test_ctrl_c_with_stdout_piped_leaves_exactly_the_partial_answer_the_job_keeps(
    env: dict[str, str], client: Client
) -> None:
    """The chunk the worker wrote between the interrupt and its stop was kept in the job's output
    but never printed: piped, stdout held ~450 of its ~830 characters."""
    args = ["ask", "Count slowly", "--model", "sim-realtime", "--max-tokens", "3000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "spool.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a foreground program
    )
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + 60
    printed = b""
    while len(printed) < 40 and time.monotonic() < deadline:  # the answer is on its way
        if select.select([process.stdout], [], [], 1)[0]:
            printed += os.read(process.stdout.fileno(), 4096)
    assert printed, "no answer within 60 s"
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    job = client.job(job_id_in(err.decode()), output=True)
    assert job["status"] == "cancelled"
    ended = "" if job["output"].endswith("\n") else "\n"  # piped: the text, and a final newline
    assert (printed + rest).decode() == job["output"] + ended


@pytest.mark.parametrize("stop", ["sigterm", "hangup"])
def test_sigterm_or_a_closed_terminal_cancels_the_job(env: dict[str, str], client: Client, stop: str) -> None:
    """SIGTERM, or the terminal closing under it (SIGHUP, then every write fails with EIO), ended
    `spool ask` at once and left the job running to its end, billed."""
    terminal = Terminal(["ask", "Count slowly", "--model", "sim-realtime", "--max-tokens", "3000"], env)
    assert terminal.read_until(lambda text: "tok/s" in text, timeout=60), terminal.text
    job_id = job_id_in(terminal.text)
    if stop == "sigterm":
        terminal.process.send_signal(signal.SIGTERM)
        assert terminal.finish() == 130, terminal.text
        assert "cancelled: stopped after" in terminal.text
    else:
        os.close(terminal.leader)  # the terminal's window closed: the kernel sends SIGHUP
        try:
            assert terminal.process.wait(timeout=120) == 130
        except subprocess.TimeoutExpired:
            os.killpg(terminal.process.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 60  # the CLI waits for the stop at most 10 s; a busy machine is slower
    job = client.job(job_id, output=False)
    while job["status"] not in {"completed", "failed", "cancelled"} and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.job(job_id, output=False)
    assert job["status"] == "cancelled"


# ---------------------------------------------------------------------------------------- errors
def test_a_stack_that_is_down_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = cli_env("http://127.0.0.1:9", tmp_path)  # nothing listens on the discard port
    down = spool(env, "models")
    assert down.returncode == 2
    assert down.stdout == ""
    (line,) = down.stderr.splitlines()
    assert line.startswith("error: Could not reach Spool at http://127.0.0.1:9")
    assert "make dev" in line
    assert "Traceback" not in down.stderr
    debug = spool(env, "--debug", "models")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ConnectionFailed" in debug.stderr


def test_version_and_help(tmp_path: Path) -> None:
    env = cli_env("http://127.0.0.1:9", tmp_path)
    version = spool(env, "--version")
    assert version.returncode == 0
    assert re.fullmatch(r"spool \d+\.\d+\.\d+\S*\n", version.stdout)
    helped = spool(env, "ask", "--help")
    assert helped.returncode == 0
    assert "`" not in helped.stdout
    assert "(default: 1024)" in helped.stdout


# ------------------------------------------------------------------------------------ read-only
def test_models_usage_and_health_as_tables_and_json(env: dict[str, str]) -> None:
    models = json.loads(spool(env, "models", "--json").stdout)
    assert {"sim-fast", "sim-realtime"} <= {m["id"] for m in models}
    table = spool(env, "models").stdout.splitlines()
    assert table[0].split()[:3] == ["MODEL", "ALIASES", "CONTEXT"]
    realtime = next(row for row in table if row.startswith("sim-realtime"))
    assert "128,000" in realtime and "sim-fast" in realtime  # its context window and fallback

    usage = json.loads(spool(env, "usage", "--json").stdout)
    assert set(usage) >= {"since", "until", "days", "totals", "limits"}
    shown = spool(env, "usage").stdout
    assert f"usage {usage['since']} to {usage['until']}" in shown
    assert "tokens per minute:" in shown and "concurrent jobs:" in shown
    bad = spool(env, "usage", "--since", "last week")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr

    health = json.loads(spool(env, "health", "--json").stdout)
    assert health["status"] in {"ok", "degraded"}
    rows = spool(env, "health").stdout.splitlines()
    assert rows[0].startswith(health["status"])
    assert rows[1].split() == ["CHECK", "STATUS", "LATENCY", "DETAILS"]
    assert any(row.startswith("dynamodb") for row in rows)


def test_jobs_and_contexts_list_as_tables_and_json(
    env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    job = client.create_job("listed", model="sim-fast", max_tokens=5)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "a.py").write_text("A = 1\n")
    context = client.sync_directory(tmp_path / "ctx")

    listed = json.loads(spool(env, "jobs", "list", "--json", "--limit", "100").stdout)
    assert job["job_id"] in {j["job_id"] for j in listed}
    assert all("output" not in j for j in listed)
    every = json.loads(spool(env, "jobs", "list", "--all", "--limit", "2", "--json").stdout)
    ids = [j["job_id"] for j in every]
    assert job["job_id"] in ids and len(ids) == len(set(ids))  # every page, none twice
    table = spool(env, "jobs", "list", "--limit", "100").stdout.splitlines()
    assert table[0].split() == ["JOB", "ID", "STATUS", "MODEL", "IN", "OUT", "COST", "CREATED"]
    row = next(r for r in table if r.startswith(job["job_id"]))
    assert "sim-fast" in row.split()

    contexts = json.loads(spool(env, "contexts", "list", "--json", "--limit", "100").stdout)
    assert context["context_id"] in {c["context_id"] for c in contexts}
    table = spool(env, "contexts", "list", "--limit", "100").stdout.splitlines()
    assert table[0].split()[:3] == ["CONTEXT", "ID", "VERSION"]
    assert any(r.startswith(context["context_id"]) for r in table)


# ------------------------------------------------------------------------------------- contexts
def test_contexts_sync_of_a_missing_directory_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = spool(env, "contexts", "sync", str(missing))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and "nowhere" in line
    assert "Traceback" not in done.stderr


def test_contexts_sync_reports_skipped_files_and_an_unchanged_resync(
    env: dict[str, str], project: Path
) -> None:
    first = spool(env, "contexts", "sync", str(project))
    assert first.returncode == 0, first.stderr
    context_id = first.stdout.strip()
    assert context_id.startswith("ctx_")
    assert f"context {context_id} version 1: 1 files" in first.stderr
    assert "skipped 1 file: logo.png (binary)" in first.stderr
    again = spool(env, "contexts", "sync", str(project), "--json")
    assert json.loads(again.stdout)["changed"] is False
    assert f"context {context_id} unchanged (version 1" in again.stderr


@pytest.fixture(scope="module")
def roomy_stack() -> Iterator[RunningStack]:
    """A stack with the deployed context limit (50 MiB): the session stack keeps contexts to 1 MiB."""
    stack = start_stack()
    yield stack
    stop_stack(stack)


def test_a_20_mb_directory_syncs_with_a_progress_bar(roomy_stack: RunningStack, tmp_path: Path) -> None:
    project = tmp_path / "big"
    line = "def handler(event, context):  # a line of code as a repository holds many\n"
    body = line * (250_000 // len(line))
    for index in range(80):  # 80 files of 250 KB: 20 MB
        folder = project / f"pkg{index % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"module_{index}.py").write_text(f"# module {index}\n{body}")
    terminal = Terminal(["contexts", "sync", str(project)], cli_env(roomy_stack.base_url, tmp_path))
    assert terminal.finish(timeout=300) == 0, terminal.text
    text = terminal.text
    assert "uploading" in text and "━" in text and "MB" in text  # the upload's progress bar was drawn
    *_, summary, context_id = [line for line in answer_in(text).splitlines() if line]
    assert re.fullmatch(r"context ctx_\w+ version 1: 80 files, [\d,]+ tokens, uploaded presigned", summary)
    assert context_id.startswith("ctx_") and context_id in summary


# ------------------------------------------------------------------------------ tour and admin
def test_the_demo_drops_the_connection_and_resumes(dev_stack: RunningStack, tmp_path: Path) -> None:
    result = spool(
        {**os.environ, "SPOOL_CACHE_DIR": str(tmp_path / "cache")},
        "demo",
        "--url",
        dev_stack.base_url,
        "--key",
        DEV_KEY,
        "--max-tokens",
        "80",
        "--drop-after",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "connection dropped after chunk 3; reconnecting with Last-Event-ID: 3" in result.stderr
    assert "[resumed at chunk 4: " in result.stderr  # something came after the reconnect
    assert "completed:" in result.stderr
    assert len(result.stdout.split()) >= 60  # the whole answer was printed across the reconnect


def test_keys_and_limits_work_against_the_local_stack_with_no_flags(dev_stack: RunningStack) -> None:
    env = {**os.environ, "SPOOL_URL": dev_stack.base_url}
    created = spool(env, "keys", "create", "--tenant", "cli-tenant")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert "the local stack" in created.stderr
    limited = spool(
        env,
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
    listed = json.loads(spool(env, "keys", "list", "--tenant", "cli-tenant", "--json").stdout)
    assert [k["status"] for k in listed] == ["active"]
    # back to the defaults, which the stack tells the CLI (it carries the buckets over to them)
    reset = spool(env, "limits", "reset", "--tenant", "cli-tenant")
    assert reset.returncode == 0, reset.stderr
    assert "default limits" in reset.stdout
    usage = dev_stack.request("GET", "/v1/usage", key=key)[2]
    assert usage["limits"]["tokens_per_minute"]["limit"] == 200_000

    nowhere = {**os.environ, "SPOOL_URL": "http://127.0.0.1:9"}
    for args in (["limits", "get", "--tenant", "x"], ["keys", "list"]):
        done = spool(nowhere, *args)
        assert done.returncode == 2
        (line,) = done.stderr.splitlines()
        assert "No local Spool stack answers at http://127.0.0.1:9" in line
        assert "Traceback" not in done.stderr
