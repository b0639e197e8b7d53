"""Circuits shared by every tenant, through the whole stack: one tenant's jobs failing on a model's 5xx
open its circuits; another tenant's clean jobs queued while they are open wait for the probe and
complete (they failed model_unavailable at once, no call made), and health reports a circuit whose
cool-down has passed as half-open (it said open, with a retry_at in the past, until the next call)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import DEV_KEY, OTHER_KEY, RunningStack, start_stack, stop_stack
from tests.support import wait_for

COOLDOWN_SECONDS = 8  # long enough for the clean jobs to be picked up while the circuits are open
# On any model, every attempt: each failing job fails on sim-realtime, then on its fallback sim-fast.
SERVER_ERRORS = {"simulate": {"fault": "server_error", "at_token": 0, "times": 50}}


@pytest.fixture(scope="module")
def circuits_stack() -> Iterator[RunningStack]:
    stack = start_stack(
        {"SPOOL_SIMULATOR_FAULTS": "1", "SPOOL_CIRCUIT_COOLDOWN_SECONDS": str(COOLDOWN_SECONDS)}
    )
    yield stack
    stop_stack(stack)


def create(stack: RunningStack, key: str, body: dict[str, Any]) -> str:
    status, _, job = stack.request(
        "POST", "/v1/jobs", body=body, key=key, headers={"Idempotency-Key": str(uuid.uuid4())}
    )
    assert status == 202, job
    job_id: str = job["job_id"]
    return job_id


def ended(stack: RunningStack, key: str, job_id: str) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        status, _, job = stack.request("GET", f"/v1/jobs/{job_id}?output=false", key=key)
        assert status == 200
        return job if job["status"] in {"completed", "failed", "cancelled"} else None

    job: dict[str, Any] = wait_for(terminal, timeout=180, interval=0.2, what=f"job {job_id} to end")
    return job


def circuits(stack: RunningStack) -> dict[str, dict[str, Any]]:
    status, _, health = stack.request("GET", "/v1/health", key=None)
    assert status in {200, 503}, health
    models: dict[str, dict[str, Any]] = health["checks"]["provider:simulated"]["models"]
    return models


def open_both_circuits(stack: RunningStack) -> None:
    """Tenant A's failing jobs, as many as the circuit's threshold (5): both models' circuits open."""
    failing = [
        create(
            stack,
            DEV_KEY,
            {"message": f"bad {i}", "model": "sim-realtime", "max_tokens": 20, "metadata": SERVER_ERRORS},
        )
        for i in range(5)
    ]
    assert {ended(stack, DEV_KEY, job_id)["status"] for job_id in failing} == {"failed"}


def test_clean_jobs_queued_while_another_tenants_faults_hold_the_circuits_open_complete(
    circuits_stack: RunningStack,
) -> None:
    open_both_circuits(circuits_stack)
    clean = [
        create(circuits_stack, OTHER_KEY, {"message": f"clean {i}", "model": model, "max_tokens": 20})
        for i, model in enumerate(["sim-fast", "sim-realtime"] * 2)
    ]
    jobs = [ended(circuits_stack, OTHER_KEY, job_id) for job_id in clean]
    assert [(job["status"], job["error"]) for job in jobs] == [("completed", None)] * 4
    assert all(job["usage"]["output_tokens"] == 20 for job in jobs)


def test_health_reports_a_cooled_circuit_as_half_open_before_any_call(circuits_stack: RunningStack) -> None:
    open_both_circuits(circuits_stack)
    cooled = wait_for(
        lambda: (c := circuits(circuits_stack)["sim-fast"])["circuit"] == "half_open" and c,
        timeout=COOLDOWN_SECONDS + 60,
        interval=0.5,
        what="sim-fast's cooled circuit to be reported half_open",
    )
    assert cooled["retry_at"] is None
