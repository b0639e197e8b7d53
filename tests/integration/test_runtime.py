"""The local Lambda runtime: each container is its own process with the function's environment, one
invocation at a time; timeouts and crashes kill only their container; the pool is bounded."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from spool.devstack.runtime import (
    HandlerError,
    InvocationCrashed,
    InvocationThrottled,
    InvocationTimeout,
    LocalFunction,
)
from spool.devstack.template import FunctionSpec
from tests.support import wait_for

LAMBDAS = Path(__file__).parent / "lambdas"


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def probe() -> Iterator[LocalFunction]:
    function = LocalFunction(
        FunctionSpec("Probe", "probe", "app.handler", timeout=3, memory_mb=128, environment={}),
        LAMBDAS,
        region="us-east-1",
        name="probe",
        environment={"PROBE": "configured", "PATH": os.environ["PATH"]},
        max_concurrency=2,
    )
    yield function
    function.shutdown()


def test_each_container_has_its_own_process_module_state_and_environment(
    probe: LocalFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLER_ONLY", "leaked")
    first = probe.invoke({})
    assert first["variable"] == "configured"
    assert probe.invoke({"variable": "CALLER_ONLY"})["variable"] is None  # only the function's environment
    assert first["pid"] != os.getpid()
    barrier = threading.Barrier(2)

    def concurrent(_: int) -> dict[str, Any]:
        barrier.wait()
        answer: dict[str, Any] = probe.invoke({"sleep": 0.3})
        return answer

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(concurrent, range(2)))
    assert len({a["pid"] for a in answers}) == 2  # concurrent invocations never share a container
    assert len({first["request_id"], *(a["request_id"] for a in answers)}) == 3
    assert probe.reports[0].init_duration_ms is not None  # the first invocation was a cold start
    assert probe.reports[1].init_duration_ms is None
    assert all(report.max_memory_used_mb > 0 for report in probe.reports)


def test_a_handler_error_keeps_the_container(probe: LocalFunction) -> None:
    pid = probe.invoke({})["pid"]
    with pytest.raises(HandlerError) as raised:
        probe.invoke({"raise": "bad input"})
    assert raised.value.payload["errorType"] == "ValueError"
    assert raised.value.payload["errorMessage"] == "bad input"
    assert probe.invoke({})["pid"] == pid
    assert [r.outcome for r in probe.reports] == ["result", "error", "result"]


def test_a_crash_or_a_timeout_kills_only_its_container(probe: LocalFunction) -> None:
    pid = probe.invoke({})["pid"]
    with pytest.raises(InvocationCrashed):
        probe.invoke({"exit": True})
    wait_for(lambda: not running(pid), timeout=10)
    after_crash = probe.invoke({})
    assert after_crash["pid"] != pid
    assert after_crash["invocations"] == 1  # a fresh container: a cold start, empty module state
    with pytest.raises(InvocationTimeout):
        probe.invoke({"sleep": 30})
    wait_for(lambda: not running(after_crash["pid"]), timeout=10)
    assert probe.invoke({})["remaining_ms"] > 2000  # the timeout starts with the invocation, not the init
    assert [r.outcome for r in probe.reports][-3:] == ["result", "timeout", "result"]


def test_the_pool_is_bounded_and_a_caller_waits_for_a_free_container(probe: LocalFunction) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: probe.invoke({"sleep": 0.2}), range(4)))
    assert len({a["pid"] for a in answers}) == 2  # max_concurrency=2: the others waited their turn
    assert probe.containers == 2
    busy = threading.Thread(target=probe.invoke, args=({"sleep": 2},))
    other = threading.Thread(target=probe.invoke, args=({"sleep": 2},))
    busy.start()
    other.start()
    wait_for(lambda: len(probe._busy) == 2)
    with pytest.raises(InvocationThrottled):
        probe.invoke({}, wait=0.2)
    busy.join()
    other.join()


def test_idle_containers_are_reaped_down_to_one_and_shutdown_ends_them(probe: LocalFunction) -> None:
    probe.warm(2)
    pids = {c.pid for c in probe._idle}
    assert probe.containers == 2
    probe._idle_seconds = 0.0
    assert probe.reap(keep=1) == 1
    assert probe.containers == 1
    probe.shutdown()
    for pid in pids:
        wait_for(lambda pid=pid: not running(pid), timeout=10)
