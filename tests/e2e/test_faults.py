"""Faults through the whole stack, on a worker with a short time limit: a job longer than one
invocation completes by continuation (never dead-lettered for yielding), and worker containers
killed mid-stream (the simulator's ``crash`` exits the process) lose nothing."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import RunningStack, start_stack, stop_stack
from tests.e2e.test_jobs_http import read_log, wait_terminal


@pytest.fixture(scope="module")
def short_worker() -> Iterator[RunningStack]:
    stack = start_stack(
        {
            "SPOOL_SIMULATOR_FAULTS": "1",
            "SPOOL_WORKERS": "4",
            "SPOOL_PARAMETER_OVERRIDES": "WorkerTimeoutSeconds=10 MaxReceiveCount=3",
        }
    )
    yield stack
    stop_stack(stack)


def create(stack: RunningStack, body: dict[str, Any]) -> str:
    status, _, job = stack.request(
        "POST", "/v1/jobs", body=body, headers={"Idempotency-Key": str(uuid.uuid4())}
    )
    assert status == 202, job
    job_id: str = job["job_id"]
    return job_id


def test_a_job_longer_than_the_workers_time_limit_completes(short_worker: RunningStack) -> None:
    """1,000 tokens at 50 tokens/s take 20 s; each invocation may run 10 s (5 s kept in reserve):
    the job hands over to new invocations several times, more than MaxReceiveCount, and completes."""
    body = {"message": "a long answer", "model": "sim-realtime", "max_tokens": 1000}
    job_id = create(short_worker, body)
    job = wait_terminal(short_worker, job_id, timeout=180)
    assert (job["status"], job["error"]) == ("completed", None)
    log = read_log(short_worker, job_id)
    assert [c["sequence_id"] for c in log] == list(range(1, len(log) + 1))
    assert "".join(c["text"] for c in log) == job["output"]
    assert job["usage"]["output_tokens"] == 1000


CRASHES = list(itertools.product((1, 60, 130), (1, 2)))  # at token, times: each a worker process killed


def test_worker_processes_killed_mid_stream_lose_nothing(short_worker: RunningStack) -> None:
    reference_id = create(short_worker, {"message": "kill me", "model": "sim-fast", "max_tokens": 200})
    jobs = [
        create(
            short_worker,
            {
                "message": "kill me",
                "model": "sim-fast",
                "max_tokens": 200,
                "metadata": {"simulate": {"fault": "crash", "at_token": at, "times": times}},
            },
        )
        for at, times in CRASHES
    ]
    reference = wait_terminal(short_worker, reference_id)["output"]
    for job_id in jobs:
        job = wait_terminal(short_worker, job_id, timeout=180)
        assert (job["status"], job["output"]) == (
            "completed",
            reference,
        )  # the metadata never changes the text
        log = read_log(short_worker, job_id)
        assert [c["sequence_id"] for c in log] == list(range(1, len(log) + 1))
        assert "".join(c["text"] for c in log) == reference
    status, _, usage = short_worker.request("GET", "/v1/usage")
    assert status == 200
    assert usage["totals"]["jobs"] == len(jobs) + 2  # each settled once (with the long job above)
    assert usage["limits"]["concurrent_jobs"]["running"] == 0


def test_a_worker_killed_at_every_delivery_keeps_what_each_wrote_before(short_worker: RunningStack) -> None:
    """Killed at token 40 at each of its MaxReceiveCount deliveries, on a model that sends its tokens
    at once: the job dead-lettered with nothing in its log, though each attempt's first token is
    written at once. The provider's stream was read ahead of the worker, so the simulated crash (the
    provider's own code ending the process) came before the worker had taken the first token."""
    fault = {"fault": "crash", "at_token": 40, "times": 3}
    job_id = create(
        short_worker,
        {"message": "kill me", "model": "sim-fast", "max_tokens": 200, "metadata": {"simulate": fault}},
    )
    job = wait_terminal(short_worker, job_id, timeout=180)
    assert job["status"] == "failed"
    log = read_log(short_worker, job_id)
    assert log and [c["sequence_id"] for c in log] == list(range(1, len(log) + 1))
    assert job["first_token_at"] is not None
