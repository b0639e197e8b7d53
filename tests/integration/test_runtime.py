"""The local Lambda runtime: each container is its own process with the function's environment, one
invocation at a time; timeouts and crashes kill only their container; the pool is bounded."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from spool.devstack.runtime import (
    HandlerError,
    HttpRequest,
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


def killed(function: LocalFunction, pid: int) -> None:
    """Wait until the killed container is gone, its end of the channel closed with it: the kernel
    closes a dead process's sockets a moment after it leaves the process table."""
    wait_for(lambda: not running(pid), timeout=10)
    wait_for(lambda: not any(c.alive() for c in function._idle if c.pid == pid), timeout=10)


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


def two_at_once(probe: LocalFunction) -> list[dict[str, Any]]:
    """Two invocations released together, each long enough to hold its container meanwhile."""
    barrier = threading.Barrier(2)

    def concurrent(_: int) -> dict[str, Any]:
        barrier.wait()
        answer: dict[str, Any] = probe.invoke({"sleep": 0.3})
        return answer

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(concurrent, range(2)))


def test_each_container_has_its_own_process_module_state_and_environment(
    probe: LocalFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLER_ONLY", "leaked")
    first = probe.invoke({})
    assert first["variable"] == "configured"
    assert probe.invoke({"variable": "CALLER_ONLY"})["variable"] is None  # only the function's environment
    assert first["pid"] != os.getpid()
    answers = two_at_once(probe)
    assert len({a["pid"] for a in answers}) == 2  # concurrent invocations never share a container
    assert len({first["request_id"], *(a["request_id"] for a in answers)}) == 3
    assert probe.reports[0].init_duration_ms is not None  # the first invocation was a cold start
    assert probe.reports[1].init_duration_ms is None
    assert all(report.max_memory_used_mb > 0 for report in probe.reports)


def test_a_functions_containers_start_from_one_init_done_with_its_environment(probe: LocalFunction) -> None:
    answers = two_at_once(probe)
    assert len({a["pid"] for a in answers}) == 2
    # Both were forked from one process that imported the handler once, with the function's
    # environment (not the caller's, not the shared fork server's), as a pool of warm sandboxes.
    assert len({a["imported_by"] for a in answers}) == 1
    assert answers[0]["imported_by"] not in {os.getpid(), *(a["pid"] for a in answers)}
    assert {a["imported_with"] for a in answers} == {"configured"}
    assert all(report.init_duration_ms is not None for report in probe.reports)


def test_a_function_with_another_environment_has_its_own_init(probe: LocalFunction) -> None:
    other = LocalFunction(
        probe.spec,
        LAMBDAS,
        region="us-east-1",
        name="probe",
        environment={"PROBE": "other", "PATH": os.environ["PATH"]},
    )
    try:
        mine, theirs = probe.invoke({}), other.invoke({})
    finally:
        other.shutdown()
    assert (mine["imported_with"], theirs["imported_with"]) == ("configured", "other")
    assert mine["imported_by"] != theirs["imported_by"]


def test_a_handler_error_keeps_the_container(probe: LocalFunction) -> None:
    pid = probe.invoke({})["pid"]
    with pytest.raises(HandlerError) as raised:
        probe.invoke({"raise": "bad input"})
    assert raised.value.payload["errorType"] == "ValueError"
    assert raised.value.payload["errorMessage"] == "bad input"
    assert probe.invoke({})["pid"] == pid
    assert [r.outcome for r in probe.reports] == ["result", "error", "result"]


def test_on_start_is_called_once_the_container_is_up_before_the_handler_runs(probe: LocalFunction) -> None:
    calls: list[int] = []
    result = probe.invoke({}, on_start=lambda: calls.append(probe.containers))
    assert calls == [1]  # after the cold start
    assert result["invocations"] == 1
    assert probe.reports[-1].init_duration_ms is not None


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


def test_a_container_that_died_while_idle_is_not_handed_the_next_invocation(probe: LocalFunction) -> None:
    """Killed between invocations (an out-of-memory kill, a kill -9): the next invocation starts a
    new container, as Lambda never hands a request to a dead environment; it answered a crash."""
    pid = probe.invoke({})["pid"]
    os.kill(pid, signal.SIGKILL)
    killed(probe, pid)
    answer = probe.invoke({})
    assert answer["pid"] != pid and answer["invocations"] == 1
    assert probe.containers == 1  # the dead one is not counted against the pool
    assert [r.outcome for r in probe.reports][-1] == "result"


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


# ---------------------------------------------------------------------------------------- web apps
@pytest.fixture
def web() -> Iterator[Any]:
    made: list[LocalFunction] = []

    def make(timeout: int = 10, **environment: str) -> LocalFunction:
        spec = FunctionSpec(
            "WebProbe",
            "webprobe",
            "run.sh",
            timeout=timeout,
            memory_mb=256,
            environment={},
            web_app="app:app",
            readiness_path="/healthz",
        )
        function = LocalFunction(
            spec,
            LAMBDAS,
            region="us-east-1",
            name="webprobe",
            environment={"PROBE": "web", "PATH": os.environ["PATH"], **environment},
            max_concurrency=2,
        )
        made.append(function)
        return function

    yield make
    for function in made:
        function.shutdown()


def get(function: LocalFunction, target: str, headers: dict[str, str] | None = None) -> Any:
    return function.open_http(HttpRequest("GET", target, headers or {}))


def test_a_web_container_serves_the_app_with_the_adapters_headers(web: Any) -> None:
    function = web()
    response = get(function, "/whoami", {"x-amzn-request-context": '{"requestId": "r-1"}'})
    seen = json.loads(b"".join(response.chunks()))
    assert response.status == 200
    assert seen["pid"] != os.getpid() and seen["variable"] == "web"
    assert json.loads(seen["context"]) == {"requestId": "r-1"}
    assert json.loads(seen["lambda"])["invoked_function_arn"].endswith(":function:webprobe")
    again = json.loads(b"".join(get(function, "/whoami").chunks()))
    assert again["pid"] == seen["pid"]  # the warm container served the next request
    assert function.reports[-1].outcome == "result"


def test_a_stream_past_the_functions_timeout_kills_its_container(web: Any) -> None:
    function = web(timeout=1)
    pid = json.loads(b"".join(get(function, "/whoami").chunks()))["pid"]
    response = get(function, "/stream?n=1000&delay=0.05")
    with pytest.raises(InvocationTimeout):
        for _ in response.chunks():
            pass
    wait_for(lambda: not running(pid), timeout=30, what="the timed-out container to be killed")
    assert function.reports[-1].outcome == "timeout"
    assert json.loads(b"".join(get(function, "/whoami").chunks()))["pid"] != pid  # a new container


def test_a_container_that_dies_mid_stream_breaks_the_stream_off(web: Any) -> None:
    function = web()
    response = get(function, "/stream?n=5&crash_at=2")
    received: list[bytes] = []
    with pytest.raises(InvocationCrashed):
        received.extend(response.chunks())
    assert b"".join(received).startswith(b"line 0\n")
    assert function.reports[-1].outcome == "crash"
    assert json.loads(b"".join(get(function, "/whoami").chunks()))["variable"] == "web"  # the pool recovers


def test_a_web_container_that_died_while_idle_is_replaced(web: Any) -> None:
    function = web()
    pid = json.loads(b"".join(get(function, "/whoami").chunks()))["pid"]
    os.kill(pid, signal.SIGKILL)
    killed(function, pid)
    response = get(function, "/whoami")
    assert response.status == 200 and json.loads(b"".join(response.chunks()))["pid"] != pid


def test_a_client_that_goes_away_frees_the_container(web: Any) -> None:
    function = web()
    pid = json.loads(b"".join(get(function, "/whoami").chunks()))["pid"]
    response = get(function, "/stream?n=1000&delay=0.05")
    next(iter(response.chunks()))
    response.close()  # the gateway does this when the client disconnects
    assert json.loads(b"".join(get(function, "/whoami").chunks()))["pid"] == pid  # reused, not killed
    assert function.reports[-2].outcome == "result"


def test_a_web_app_that_fails_to_start_is_an_init_error(web: Any) -> None:
    function = web(PROBE_INIT_FAILS="1")
    with pytest.raises(HandlerError) as caught:
        get(function, "/whoami")
    assert "failed to start" in str(caught.value)
