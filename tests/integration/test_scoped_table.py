"""Tenant scoping against real DynamoDB wire calls: another tenant's item cannot be named."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import SNAPSHOT_ATTEMPTS, ConditionFailed, ScopedTable, snapshot_get
from spool_core.errors import DependencyUnavailable
from spool_core.tenancy import Tenant, TenantScope


def table(stack: StackDescription, tenant: str) -> ScopedTable:
    settings = bootstrap.settings()
    return ScopedTable(aws.dynamodb(settings), settings.jobs_table, TenantScope(Tenant(tenant)))


def test_a_tenant_reads_its_own_items_and_never_anothers(stack: StackDescription) -> None:
    acme, globex = table(stack, "acme"), table(stack, "globex")
    acme.put("job", "job_1", {"status": "queued", "ratio": 0.5, "tags": ["a"]})
    assert acme.get("job", "job_1") == {
        "pk": "acme#job#job_1",
        "status": "queued",
        "ratio": 0.5,
        "tags": ["a"],
    }
    assert globex.get("job", "job_1") is None
    globex.delete("job", "job_1")  # a no-op on acme's item
    assert acme.get("job", "job_1") is not None


def test_conditional_writes_raise_condition_failed_with_the_current_item(stack: StackDescription) -> None:
    acme = table(stack, "acme")
    acme.put("job", "job_2", {"status": "queued"}, condition="attribute_not_exists(pk)")
    with pytest.raises(ConditionFailed) as failed:
        acme.put("job", "job_2", {"status": "running"}, condition="attribute_not_exists(pk)")
    assert failed.value.item is not None and failed.value.item["status"] == "queued"
    updated = acme.update(
        "job",
        "job_2",
        "SET #s = :s",
        condition="#s = :q",
        names={"#s": "status"},
        values={":s": "running", ":q": "queued"},
    )
    assert updated["status"] == "running"


def test_query_pages_lazily_up_to_a_limit(stack: StackDescription) -> None:
    settings = bootstrap.settings()
    chunks = ScopedTable(aws.dynamodb(settings), settings.chunks_table, TenantScope(Tenant("acme")))
    for seq in range(1, 8):
        chunks.put("job", "job_q", {"sequence_id": seq, "text": f"t{seq}"})
    after_three = list(
        chunks.query("job", "job_q", sort_condition="sequence_id > :after", values={":after": 3}, limit=2)
    )
    assert [c["sequence_id"] for c in after_three] == [4, 5]
    assert len(list(chunks.query("job", "job_q"))) == 7
    other = ScopedTable(aws.dynamodb(settings), settings.chunks_table, TenantScope(Tenant("globex")))
    assert list(other.query("job", "job_q")) == []


def _cancelled(*codes: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
            "CancellationReasons": [{"Code": code} for code in codes],
        },
        "TransactGetItems",
    )


def test_a_snapshot_reads_items_of_several_tables_present_or_not(stack: StackDescription) -> None:
    settings = bootstrap.settings()
    jobs = table(stack, "snap")
    usage = ScopedTable(jobs.client, settings.usage_table, TenantScope(Tenant("snap")))
    jobs.put("job", "job_s", {"status": "queued"})
    usage.put("usage", "tenant", {"sk": "limits", "tokens_per_minute": 5})
    found = snapshot_get(
        jobs.client,
        {
            settings.jobs_table: [jobs.key("job", "job_s"), jobs.key("job", "missing")],
            settings.usage_table: [usage.key("usage", "tenant", {"sk": "limits"})],
        },
    )
    assert [item["status"] for item in found[settings.jobs_table]] == ["queued"]
    assert [item["tokens_per_minute"] for item in found[settings.usage_table]] == [5]


def test_a_snapshot_refused_by_a_write_in_progress_is_read_again(
    stack: StackDescription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DynamoDB refuses a TransactGetItems while a write holds one of its items (TransactionConflict):
    read again after a short wait. Any other refusal is not a conflict and is raised."""
    acme = table(stack, "acme")
    acme.put("job", "job_c", {"status": "queued"})
    real = acme.client.transact_get_items
    refusals = [_cancelled("None", "TransactionConflict")]

    def busy_once(**request: Any) -> Any:
        if refusals:
            raise refusals.pop()
        return real(**request)

    monkeypatch.setattr(acme.client, "transact_get_items", busy_once)
    monkeypatch.setattr("spool_core.adapters.dynamodb.time.sleep", lambda seconds: None)
    name = bootstrap.settings().jobs_table
    assert snapshot_get(acme.client, {name: [acme.key("job", "job_c")]})[name][0]["status"] == "queued"
    assert not refusals
    refusals.append(_cancelled("ValidationError"))
    with pytest.raises(ClientError):
        snapshot_get(acme.client, {name: [acme.key("job", "job_c")]})
    refusals.extend([_cancelled("TransactionConflict")] * SNAPSHOT_ATTEMPTS)
    with pytest.raises(DependencyUnavailable) as busy:  # writes that never let go: not read forever
        snapshot_get(acme.client, {name: [acme.key("job", "job_c")]})
    assert not refusals and busy.value.headers["Retry-After"] == "1"
