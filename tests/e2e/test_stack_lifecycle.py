"""`spool dev` as a process: a busy port ends the start with one clear line, Ctrl-C and SIGTERM stop
everything, a SIGKILL leaves no orphan, and a clean stop and start keeps the local state."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import CLEAN_ENVIRONMENT, DEV_KEY, ROOT, RunningStack, start_stack, stop_stack
from tests.e2e.test_jobs_http import read_log, wait_terminal
from tests.support import wait_for


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited (whoever adopted it reaps it)


def wait_gone(pids: set[int], timeout: float = 20) -> set[int]:
    """The processes still alive after waiting for them all to end (empty: they all did)."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(alive(p) for p in pids), timeout=timeout, what="the processes to end")
    return {p for p in pids if alive(p)}


def run_dev(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spool.cli", "dev"],
        cwd=ROOT,
        env={**CLEAN_ENVIRONMENT, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("variable", ["SPOOL_PORT", "SPOOL_WS_PORT"])
def test_a_busy_port_ends_the_start_with_one_clear_line(variable: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {variable: str(port)} if variable == "SPOOL_PORT" else {"SPOOL_PORT": "0", variable: str(port)}
        result = run_dev(env)
    assert result.returncode == 1
    assert f"port {port}" in result.stderr
    assert variable in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_everything_quietly(signum: signal.Signals) -> None:
    stack = start_stack()
    processes = descendants(stack.process.pid)
    assert len(processes) >= 3  # moto, the fork server, containers
    stack.process.send_signal(signum)
    assert stack.process.wait(timeout=60) == 0
    assert wait_gone(processes) == set()
    assert stack.reader is not None
    stack.reader.join(timeout=10)
    after = stack.output[next(i for i, line in enumerate(stack.output) if "stopping" in line) :]
    assert len(after) <= 4, after
    assert not any("Traceback" in line for line in stack.output)


def test_children_exit_when_spool_dev_is_killed() -> None:
    stack = start_stack()
    processes = descendants(stack.process.pid)
    stack.process.kill()
    stack.process.wait(timeout=10)
    assert wait_gone(processes) == set()


def test_a_clean_stop_and_start_keeps_contexts_jobs_usage_and_idempotency(tmp_path: Path) -> None:
    env = {"SPOOL_STATE_DIR": str(tmp_path / "state")}
    stack = start_stack(env)
    try:
        status, _, context = stack.request(
            "POST", "/v1/contexts", body={"files": [{"path": "a.py", "content": "x = 1\n"}]}
        )
        assert status == 201
        key = str(uuid.uuid4())
        body = {"message": "kept", "model": "sim-fast", "max_tokens": 40, "context_id": context["context_id"]}
        status, _, job = stack.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": key})
        assert status == 202
        finished = wait_terminal(stack, job["job_id"])
        running_body = {"message": "interrupted", "model": "sim-realtime", "max_tokens": 400}
        status, _, running = stack.request(
            "POST", "/v1/jobs", body=running_body, headers={"Idempotency-Key": str(uuid.uuid4())}
        )
        assert status == 202
        first_chunk(stack, running["job_id"])
        usage = stack.request("GET", "/v1/usage")[2]
        events_link = stack.request("GET", f"/v1/jobs/{job['job_id']}?output=false")[2]["links"]["events"]
        # the directory is this stack's while it runs: a second stack on it is refused at once
        second = run_dev({**env, "SPOOL_PORT": "0"})
        assert second.returncode == 1, second.stderr
        assert "another local stack (pid " in second.stderr and "SPOOL_STATE_DIR" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
    finally:
        assert stop_stack(stack) == 0
    assert any("saved" in line for line in stack.output)

    again = start_stack(env)
    try:
        assert any("restored local state" in line for line in again.output)
        status, _, read = again.request("GET", f"/v1/contexts/{context['context_id']}")
        assert (status, [f["path"] for f in read["files"]]) == (200, ["a.py"])
        status, _, replay = again.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": key})
        assert (status, replay["job_id"], replay["output"]) == (200, job["job_id"], finished["output"])
        assert "".join(c["text"] for c in read_log(again, job["job_id"])) == finished["output"]
        assert again.request("GET", "/v1/usage")[2]["totals"]["jobs"] >= usage["totals"]["jobs"]
        # a links.events URL handed out before the restart still opens its stream (its token names
        # the dev key's id, which a restart keeps)
        with urllib.request.urlopen(events_link.replace(stack.base_url, again.base_url), timeout=60) as sse:  # noqa: S310
            assert sse.status == 200 and b"event: done" in sse.read()
        resumed = wait_terminal(again, running["job_id"], timeout=120)  # the interrupted job carries on
        assert resumed["status"] == "completed"
        assert "".join(c["text"] for c in read_log(again, running["job_id"])) == resumed["output"]
    finally:
        stop_stack(again)


def first_chunk(stack: RunningStack, job_id: str) -> dict[str, Any]:
    status, _, page = stack.request("GET", f"/v1/jobs/{job_id}/chunks?after=0&wait=20")
    assert status == 200 and page["chunks"], page
    chunk: dict[str, Any] = page["chunks"][0]
    return chunk


def test_a_state_directory_that_cannot_be_used_is_said_at_the_start(tmp_path: Path) -> None:
    """Not at the stop that would have saved the work: a path under a file, or a damaged snapshot
    (named, with what to do)."""
    (tmp_path / "a-file").write_text("")
    result = run_dev({"SPOOL_PORT": "0", "SPOOL_STATE_DIR": str(tmp_path / "a-file" / "state")})
    assert result.returncode == 1
    assert "cannot keep the local state in" in result.stderr and "Traceback" not in result.stderr
    state = tmp_path / "state"
    snapshot = state / "snapshot"
    snapshot.mkdir(parents=True)
    (snapshot / "manifest.json").write_text(
        json.dumps({"version": 1, "tables": {"JobsTable": "table-JobsTable.jsonl"}})
    )
    (snapshot / "table-JobsTable.jsonl").write_text('{"pk": {"S": "cut sh')
    result = run_dev({"SPOOL_PORT": "0", "SPOOL_STATE_DIR": str(state)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is damaged (table-JobsTable.jsonl:" in result.stderr and f"mv {snapshot}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_stop_saves_the_state_though_nobody_reads_its_output_any_more(tmp_path: Path) -> None:
    """`make dev | tee log`, then Ctrl-C: the terminal's SIGINT ends tee too, and the stack's lines
    about stopping go to a closed pipe. It must still stop and save."""
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "spool.cli", "dev"],
        cwd=ROOT,
        env={
            **CLEAN_ENVIRONMENT,
            "SPOOL_PORT": "0",
            "SPOOL_DEV_KEYS": f"{DEV_KEY}:tenant-a",
            "SPOOL_STATE_DIR": str(state),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until ready (the test's deadline bounds the wait)
            if found := re.search(r"ready on (http://\S+)", line):
                stack = RunningStack(process, found.group(1))
                break
        key = str(uuid.uuid4())
        body = {"message": "kept", "model": "sim-fast", "max_tokens": 10}
        status, _, job = stack.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": key})
        assert status == 202
        process.stdout.close()  # the reader goes away
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    saved = (state / "snapshot" / "table-JobsTable.jsonl").read_text()
    assert job["job_id"] in saved


def test_a_stop_before_ready_saves_what_the_restored_state_has_become(tmp_path: Path) -> None:
    """A restored backlog can keep the start busy for minutes: Ctrl-C then saves, as any stop does
    (it used to throw away everything since the restart, and the next start ran the same jobs)."""
    env = {"SPOOL_STATE_DIR": str(tmp_path / "state")}
    assert stop_stack(start_stack(env)) == 0
    manifest = tmp_path / "state" / "snapshot" / "manifest.json"
    first = json.loads(manifest.read_text())["saved_at"]
    process = subprocess.Popen(
        [sys.executable, "-m", "spool.cli", "dev"],
        cwd=ROOT,
        env={**CLEAN_ENVIRONMENT, "SPOOL_PORT": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "restored local state" in line:
                process.send_signal(signal.SIGINT)
                time.sleep(0.2)  # a user pressing Ctrl-C twice: the second must not cut the save short
                process.send_signal(signal.SIGINT)
                break
            assert "ready on" not in line, "the start was over before the test could stop it"
        rest = process.stdout.read()
        assert process.wait(timeout=60) == 130, rest  # not -2: the second Ctrl-C came as it exited
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped before it was ready" in rest and "spool: saved" in rest, rest
    assert "Traceback" not in rest
    assert json.loads(manifest.read_text())["saved_at"] > first


def test_a_start_after_a_stack_that_never_stopped_says_what_was_lost(tmp_path: Path) -> None:
    """A killed stack saves nothing: the next start rolls back to the last snapshot (here, none), and
    says so rather than in silence."""
    env = {"SPOOL_STATE_DIR": str(tmp_path / "state")}
    killed = start_stack(env)
    body = {"message": "lost", "model": "sim-fast", "max_tokens": 10}
    status, _, job = killed.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": "k-lost"})
    assert status == 202
    killed.process.kill()
    killed.process.wait(timeout=10)
    again = start_stack(env)
    try:
        said = [line for line in again.output if "did not stop" in line]
        assert len(said) == 1 and f"(pid {killed.process.pid}, started " in said[0], again.output
        assert "no snapshot was ever saved here" in said[0] and "what it did is lost" in said[0]
        assert again.request("GET", f"/v1/jobs/{job['job_id']}")[0] == 404
    finally:
        assert stop_stack(again) == 0
    third = start_stack(env)  # that stop saved: nothing more to say
    try:
        assert not any("did not stop" in line for line in third.output)
    finally:
        stop_stack(third)


def test_a_stop_keeps_the_message_of_a_job_whose_worker_just_crashed(tmp_path: Path) -> None:
    """The crashed worker's message is hidden until its visibility timeout: a snapshot taken at
    once held no message, and the job sat `running` after the restart until the sweeper found it."""
    env = {"SPOOL_STATE_DIR": str(tmp_path / "state"), "SPOOL_SIMULATOR_FAULTS": "1"}
    stack = start_stack(env)
    body = {
        "message": "crash, then stop",
        "model": "sim-realtime",
        "max_tokens": 300,
        "metadata": {"simulate": {"fault": "crash", "at_token": 20}},
    }
    status, _, job = stack.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": "k-crash"})
    assert status == 202
    wait_for(
        lambda: any("return to the queue" in line for line in list(stack.output)),
        timeout=60,
        what="the worker's crash",
    )
    assert stop_stack(stack) == 0
    manifest = json.loads((tmp_path / "state" / "snapshot" / "manifest.json").read_text())
    assert any(job["job_id"] in message["body"] for message in manifest["queues"]["JobsQueue"]), manifest[
        "queues"
    ]


def test_a_stack_whose_aws_endpoint_died_says_so_and_ends() -> None:
    """moto killed under the stack: every request would fail, and the pollers logged tracebacks for
    good while the stack still said it was ready. It now ends with one line naming the endpoint."""
    stack = start_stack()
    (moto,) = [
        pid
        for pid in descendants(stack.process.pid)
        if b"spool.devstack.moto_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(moto, signal.SIGKILL)
    assert stack.process.wait(timeout=60) == 1
    assert stack.reader is not None
    stack.reader.join(timeout=10)
    said = [line for line in stack.output if "the local AWS endpoint (moto" in line]
    assert len(said) == 1 and "exited with code -9" in said[0] and "make dev" in said[0], stack.output[-10:]
