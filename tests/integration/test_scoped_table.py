"""Tenant scoping against real DynamoDB wire calls: another tenant's item cannot be named."""

from __future__ import annotations

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable
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
