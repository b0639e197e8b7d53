"""A fault matrix on real DynamoDB (the stack's moto): 120 jobs, each with a fault (a crash of its
attempt, throttling, server errors, a permanent error) at a token position, repeated a number of
times. Afterwards: no token lost or duplicated in any log, every finished text equal to the
uninterrupted one, every job settled exactly once, every slot back."""

from __future__ import annotations

import itertools
from typing import Any

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.jobs.model import JobRequest
from spool_core.jobs.runner import Outcome
from spool_core.tenancy import Tenant
from tests.integration.test_jobs import expected_text, expire_lease, runner_for
from tests.ledger import Crash

FAULTS = ("crash", "throttle", "server_error", "fatal")
POSITIONS = (0, 1, 63, 64, 150)
REPEATS = (1, 2, 4)
MODELS = ("sim-fast", "sim-realtime")
MAX_RETRIES = 3  # within one invocation, for throttling and server errors


def run_until_done(tenant: Tenant, job_id: str, limit: int = 10) -> int:
    """Deliver the job's message until an attempt ends it: a crashed attempt's lease runs out and its
    message comes back, as SQS and Lambda would do. Returns the number of deliveries."""
    for delivery in range(1, limit + 1):
        try:
            outcome = runner_for(tenant, flush_tokens=32, max_retries=MAX_RETRIES).run(job_id)
        except Crash:
            expire_lease(tenant, job_id)
            continue
        if outcome is Outcome.DONE:
            return delivery
        expire_lease(tenant, job_id)
    raise AssertionError(f"{job_id} did not end in {limit} deliveries")


def test_a_fault_matrix_loses_nothing_and_settles_everything_once(stack: StackDescription) -> None:
    tenant = Tenant("fault-matrix")
    service = bootstrap.job_service(tenant)
    cases: list[dict[str, Any]] = []
    for fault, at, times, model in itertools.product(FAULTS, POSITIONS, REPEATS, MODELS):
        body = {
            "message": f"matrix {model}",
            "model": model,
            "max_tokens": 200,
            "fallback": False,
            "metadata": {"simulate": {"fault": fault, "at_token": at, "times": times}},
        }
        created = service.create(f"{fault}-{at}-{times}-{model}", JobRequest.model_validate(body)).job
        deliveries = run_until_done(tenant, created.job_id)  # one at a time: 16 may run at once
        cases.append(
            {"job_id": created.job_id, "fault": fault, "at": at, "times": times, "deliveries": deliveries}
        )
    assert len(cases) >= 100

    reference: dict[str, str] = {}
    total_output = 0
    for case in cases:
        job = service.get(case["job_id"])
        log = service.chunks(job.job_id, after=0, limit=1000)["chunks"]
        assert [c["sequence_id"] for c in log] == list(range(1, len(log) + 1)), case  # no gap, no repeat
        text = "".join(c["text"] for c in log)
        full = reference.setdefault(job.model_resolved, expected_text(service, job.job_id))
        assert full.startswith(text), case  # never a token that the uninterrupted run does not have
        last = service._chunks.last(job.job_id)
        assert (
            job.usage.output_tokens == job.progress.tokens_generated == (last.tokens_total if last else 0)
        ), case
        total_output += job.usage.output_tokens
        fault, at, times = case["fault"], case["at"], case["times"]
        if fault == "crash" or (fault in {"throttle", "server_error"} and times <= MAX_RETRIES):
            assert (job.status, text, service.view(job)["output"]) == ("completed", full, full), case
            assert case["deliveries"] == (times + 1 if fault == "crash" else 1), case
        elif fault == "fatal":
            assert (job.status, job.error and job.error["code"]) == ("failed", "provider_error"), case
            assert job.progress.tokens_generated == at, case  # everything before the failure kept
        else:  # retries spent: the model is unavailable (no fallback allowed)
            assert (job.status, job.error and job.error["code"]) == ("failed", "model_unavailable"), case
            assert job.progress.tokens_generated == at, case

    usage = bootstrap.rate_limiter(tenant).usage(None, None)
    assert usage["totals"]["jobs"] == len(cases)  # each job settled exactly once
    assert usage["totals"]["output_tokens"] == total_output
    assert usage["limits"]["concurrent_jobs"]["running"] == 0  # every slot back
    assert usage["limits"]["tokens_per_minute"]["remaining"] >= 200_000 - sum(
        service.get(c["job_id"]).usage.input_tokens + service.get(c["job_id"]).usage.output_tokens
        for c in cases
    )  # reservations replaced by what was used
