"""`spool keys` against a stack on moto (found through CloudFormation, as a deployed one would be):
create writes a hashed key (and, with a usage plan, the tenant's API Gateway key), list shows a
tenant's keys without secrets, revoke and rotate change what authenticates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spool.cli import main
from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.api_keys import DynamoApiKeyStore
from spool_core.auth import ApiKeys, KeyCache, hash_api_key, usage_key
from tests.integration.conftest import client


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
    # bad values are refused before anything is written: nan and -3 removed the budget without a
    # word, inf crashed, a concurrency of -1 refused every job; and an option beside get is refused
    capsys.readouterr()
    for bad in (
        ["--daily-budget-usd", "nan"],
        ["--daily-budget-usd", "-3"],
        ["--daily-budget-usd", "inf"],
        ["--daily-budget-usd", "1e-10"],  # 0 nano-dollars: every job refused
        ["--max-concurrent-jobs", "-1"],
        ["--tokens-per-minute", "0"],
    ):
        with pytest.raises(SystemExit) as refused:
            main(["limits", "set", *target, *bad])
        assert refused.value.code == 2
        assert "must be" in capsys.readouterr().err
    assert main(["limits", "get", *target, "--tokens-per-minute", "5"]) == 2
    assert "only go with 'limits set'" in capsys.readouterr().err
    assert main(["limits", "get", *target]) == 0
    assert json.loads(capsys.readouterr().out)["daily_budget_usd"] == 2.5  # unchanged
    assert main(["limits", "reset", *target]) == 0
    assert main(["limits", "get", *target]) == 0
    assert "defaults apply" in capsys.readouterr().out


def test_limits_moved_from_and_back_to_the_defaults_carry_the_buckets_over(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    """A move from the deployment's defaults to limits of a tenant's own, or back (`limits reset`),
    moved no bucket: the CLI did not know the defaults. From 10 million a day to 5,000, a day's
    ~3,000 tokens read as ~1; reset, 5,000 a day's ~3,000 read as ~6 million. The CLI reads the
    defaults off the stack's parameters and carries the buckets over in the change's transaction."""
    from spool_core.tenancy import Tenant
    from tests.integration.test_limits import run_job

    tenant = Tenant("moved")
    target = ["--stack-name", stack.stack_name, "--endpoint-url", stack.endpoint_url, "--tenant", "moved"]
    used = run_job(tenant, "k1", max_tokens=3_000)  # under the defaults
    spent = used.usage.input_tokens + used.usage.output_tokens
    assert spent > 3_000

    def day_remaining() -> int:
        limits = bootstrap.rate_limiter(tenant).usage(None, None)["limits"]
        return int(limits["tokens_per_day"]["remaining"])

    own = ["--tokens-per-minute", "1000000", "--tokens-per-day", "5000", "--max-concurrent-jobs", "16"]
    assert main(["limits", "set", *target, *own]) == 0
    # what refilled at the defaults' rate before the change (116 tokens a second) is not owed
    assert 5_000 - spent - 1 <= day_remaining() <= 5_000 - spent // 2
    assert main(["limits", "reset", *target]) == 0
    assert "default limits" in capsys.readouterr().out
    assert 10_000_000 - spent - 1 <= day_remaining() <= 10_000_000 - spent // 2


def _keys(stack: StackDescription, *args: str) -> int:
    return main(["keys", *args, "--stack-name", stack.stack_name, "--endpoint-url", stack.endpoint_url])


def _uncached() -> ApiKeys:
    """The key table as the functions read it, with no cache: what they see once theirs has expired."""
    config = bootstrap.settings()
    return ApiKeys(DynamoApiKeyStore(aws.dynamodb(config), config.api_keys_table), cache=KeyCache(0))


def _created(stack: StackDescription, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """(key, key id) of a key made with `spool keys create|rotate ...`."""
    assert _keys(stack, *args) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    record = _uncached().authenticate(key)
    assert record is not None
    assert record.key_id in out.err
    return key, record.key_id


def _listed(stack: StackDescription, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert _keys(stack, "list", "--json", *args) == 0
    listed: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return listed


def test_keys_list_shows_a_tenants_keys_and_never_a_secret(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    ci_key, ci = _created(stack, capsys, "create", "--tenant", "lister", "--description", "ci")
    laptop_key, laptop = _created(stack, capsys, "create", "--tenant", "lister")
    _created(stack, capsys, "create", "--tenant", "other-lister")
    listed = _listed(stack, capsys, "--tenant", "lister")
    assert [(k["key_id"], k["tenant"], k["status"], k["description"]) for k in listed] == [
        (ci, "lister", "active", "ci"),
        (laptop, "lister", "active", ""),
    ]
    assert all(k["created_at"].endswith("Z") for k in listed)
    assert {"lister", "other-lister"} <= {k["tenant"] for k in _listed(stack, capsys)}  # every tenant's

    assert _keys(stack, "list", "--tenant", "lister") == 0
    table = capsys.readouterr().out
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["KEY", "ID", "TENANT", "STATUS"]
    assert [row.split()[:3] for row in rows] == [[ci, "lister", "active"], [laptop, "lister", "active"]]
    for secret in (ci_key, laptop_key, hash_api_key(ci_key), hash_api_key(laptop_key)):
        assert secret not in table


def test_keys_revoke_refuses_the_key_and_keeps_its_record(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    key, key_id = _created(stack, capsys, "create", "--tenant", "revoked")
    assert _keys(stack, "revoke", key_id, "--tenant", "someone-else") == 2  # not that tenant's key
    assert "api_key_not_found" in capsys.readouterr().err
    assert _keys(stack, "revoke", key_id) == 0
    assert f"revoked {key_id} (tenant revoked)" in capsys.readouterr().out
    assert _uncached().authenticate(key) is None
    (listed,) = _listed(stack, capsys, "--tenant", "revoked")
    assert listed["status"] == "revoked"
    assert listed["revoked_at"].endswith("Z")
    assert _keys(stack, "revoke", key_id) == 0  # idempotent
    capsys.readouterr()
    assert _keys(stack, "revoke", "key_nope") == 2
    assert "spool keys list" in capsys.readouterr().err


def test_keys_rotate_issues_a_new_key_and_ends_the_old_one_now_or_after_a_grace(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    old_key, old_id = _created(stack, capsys, "create", "--tenant", "rotor", "--description", "ci")
    new_key, new_id = _created(stack, capsys, "rotate", old_id)
    assert _uncached().authenticate(old_key) is None
    record = _uncached().authenticate(new_key)
    assert record is not None and (record.tenant_id, record.description) == ("rotor", "ci")

    graced_key, graced_id = _created(stack, capsys, "rotate", new_id, "--grace", "3600")
    assert _uncached().authenticate(new_key) is not None  # still works, beside its successor
    by_id = {k["key_id"]: k for k in _listed(stack, capsys, "--tenant", "rotor")}
    assert by_id[new_id]["status"] == "active"
    assert by_id[new_id]["replaced_by"] == graced_id
    assert by_id[new_id]["expires_at"] > by_id[graced_id]["created_at"]
    assert (by_id[old_id]["status"], by_id[old_id]["replaced_by"]) == ("revoked", new_id)
    assert _uncached().authenticate(graced_key) is not None
    assert _keys(stack, "rotate", old_id) == 2  # a revoked key is not rotated
    assert "api_key_revoked" in capsys.readouterr().err


def test_keys_create_puts_the_tenants_usage_key_in_the_usage_plan_once(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    apigateway = client("apigateway", stack)
    plan = apigateway.create_usage_plan(name="spool-it-plan")["id"]
    for _ in range(2):  # idempotent: the second key of a tenant finds its API key in the plan
        _created(stack, capsys, "create", "--tenant", "metered", "--usage-plan-id", plan)
    keys = [k for k in apigateway.get_api_keys(includeValues=True)["items"] if k["name"] == "spool-metered"]
    assert [(k["value"], k["enabled"]) for k in keys] == [(usage_key("metered"), True)]
    in_plan = apigateway.get_usage_plan_keys(usagePlanId=plan)["items"]
    assert [(k["id"], k["type"]) for k in in_plan] == [(keys[0]["id"], "API_KEY")]


def test_keys_create_without_a_usage_plan_output_says_so(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _keys(stack, "create", "--tenant", "unmetered") == 0
    assert "no UsagePlanId output" in capsys.readouterr().err


def test_a_first_limits_set_keeps_the_deployments_default_budget(
    stack: StackDescription, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer: a tenant on defaults that hold a daily budget lost it to its first `limits set`
    of token limits alone (its own limits had no budget). It starts from the defaults' budget now;
    `--daily-budget-usd 0` removes it."""
    from spool.admin import AdminTarget
    from spool_core.limits.model import TenantLimits

    budgeted = TenantLimits(200_000, 10_000_000, 16, daily_budget_nanos=3_000_000_000)  # $3 a day
    monkeypatch.setattr(AdminTarget, "limit_defaults", lambda self: budgeted)
    target = ["--stack-name", stack.stack_name, "--endpoint-url", stack.endpoint_url, "--tenant", "budgeted"]
    tokens = ["--tokens-per-minute", "1000", "--tokens-per-day", "9000", "--max-concurrent-jobs", "2"]
    assert main(["limits", "set", *target, *tokens]) == 0
    assert json.loads(capsys.readouterr().out)["daily_budget_usd"] == 3.0
    assert main(["limits", "set", *target, "--daily-budget-usd", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["daily_budget_usd"] is None
