"""`spool keys create` writes a hashed key into the stack's key table, found through CloudFormation."""

from __future__ import annotations

import json

import pytest

from spool.cli import main
from spool.devstack.provision import StackDescription
from spool_core import bootstrap


def test_keys_create_finds_the_table_in_the_stack_and_the_key_works(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "keys",
                "create",
                "--tenant",
                "acme",
                "--stack-name",
                stack.stack_name,
                "--endpoint-url",
                stack.endpoint_url,
            ]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    record = bootstrap.api_keys().authenticate(key)
    assert record is not None
    assert record.tenant_id == "acme"
    assert (
        main(
            [
                "keys",
                "create",
                "--tenant",
                "globex",
                "--stack-name",
                stack.stack_name,
                "--table",
                stack.refs["ApiKeysTable"],
                "--endpoint-url",
                stack.endpoint_url,
            ]
        )
        == 0
    )


def test_limits_set_get_reset_and_the_next_admission_obeys(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    from spool_core.jobs.model import JobRequest
    from spool_core.limits.errors import TooManyConcurrentJobs
    from spool_core.tenancy import Tenant

    target = ["--stack-name", stack.stack_name, "--endpoint-url", stack.endpoint_url, "--tenant", "capped"]
    assert main(["limits", "get", *target]) == 0
    assert "defaults apply" in capsys.readouterr().out
    assert (
        main(["limits", "set", *target, "--max-concurrent-jobs", "1"]) == 2
    )  # a first set needs every limit
    assert "--tokens-per-minute" in capsys.readouterr().err
    assert (
        main(
            [
                "limits",
                "set",
                *target,
                "--tokens-per-minute",
                "50000",
                "--tokens-per-day",
                "900000",
                "--max-concurrent-jobs",
                "1",
                "--daily-budget-usd",
                "2.5",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "tenant": "capped",
        "tokens_per_minute": 50000,
        "tokens_per_day": 900000,
        "max_concurrent_jobs": 1,
        "daily_budget_usd": 2.5,
    }
    jobs = bootstrap.job_service(Tenant("capped"))
    request = JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 10})
    assert jobs.create("k1", request).headers["X-RateLimit-Limit-Tokens"] == "50000"
    with pytest.raises(TooManyConcurrentJobs):  # the new limit applies at the next admission
        jobs.create("k2", request)
    assert main(["limits", "set", *target, "--max-concurrent-jobs", "2"]) == 0  # later sets merge
    assert json.loads(capsys.readouterr().out)["tokens_per_minute"] == 50000
    jobs.create("k2", request)
    assert main(["limits", "reset", *target]) == 0
    assert main(["limits", "get", *target]) == 0
    assert "defaults apply" in capsys.readouterr().out
