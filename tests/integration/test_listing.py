"""The list indexes on moto, provisioned from template.yaml: moto's GSI queries behave as DynamoDB's
(descending, Limit, LastEvaluatedKey/ExclusiveStartKey, a range condition, the INCLUDE projection),
and the jobs and contexts adapters list a tenant's items across pages, once each, none of another's."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import ScopedTable, deserialize, serialize
from spool_core.contexts.model import CreateContextRequest, FileIn, PatchContextRequest
from spool_core.errors import InvalidRequest
from spool_core.jobs.model import JobRequest, Progress
from spool_core.jobs.service import JobService
from spool_core.listing import CursorCodec, cursor_codec
from spool_core.tenancy import Tenant, TenantScope


def fresh_tenant(name: str) -> Tenant:
    return Tenant(f"{name}-{uuid.uuid4().hex[:8]}")


def every_page(list_page: Any, **query: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        page = list_page(cursor=cursor, **query)
        pages.append(page.data)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


@pytest.fixture
def cursors(stack: StackDescription) -> CursorCodec:
    return cursor_codec(bootstrap.settings())  # the deployment's secret, from Secrets Manager on moto


def test_the_tables_have_the_list_indexes_with_their_projection(stack: StackDescription) -> None:
    settings = bootstrap.settings()
    ddb = aws.dynamodb(settings)
    for table, names in (
        (settings.jobs_table, {"ListIndex", "StatusIndex"}),
        (settings.contexts_table, {"ListIndex"}),
    ):
        indexes = {
            i["IndexName"]: i for i in ddb.describe_table(TableName=table)["Table"]["GlobalSecondaryIndexes"]
        }
        assert names <= set(indexes)
        for name in names:
            assert indexes[name]["Projection"]["ProjectionType"] == "INCLUDE"


def test_moto_queries_an_index_newest_first_with_limit_and_exclusive_start_key(
    stack: StackDescription,
) -> None:
    """What the adapters rely on, checked on the wire: DynamoDB's semantics, not an emulation's."""
    settings = bootstrap.settings()
    ddb = aws.dynamodb(settings)
    tenant = fresh_tenant("wire")
    for i in range(7):
        item = {
            "pk": f"{tenant.id}#job#job_{i}",
            "list_key": tenant.id,
            "list_position": f"{1_800_000_000_000 + i:013d}#job_{i}",
            "job_id": f"job_{i}",
            "output": "x" * 100,  # not projected: never read through the index
        }
        ddb.put_item(TableName=settings.jobs_table, Item=serialize(item))
    query: dict[str, Any] = {
        "TableName": settings.jobs_table,
        "IndexName": "ListIndex",
        "KeyConditionExpression": "list_key = :k",
        "ExpressionAttributeValues": serialize({":k": tenant.id}),
        "ScanIndexForward": False,
        "Limit": 3,
    }
    seen: list[str] = []
    pages = 0
    while True:
        response = ddb.query(**query)
        items = [deserialize(raw) for raw in response["Items"]]
        assert len(items) <= 3
        assert all("output" not in item for item in items)
        seen.extend(item["job_id"] for item in items)
        pages += 1
        if "LastEvaluatedKey" not in response:
            break
        assert set(response["LastEvaluatedKey"]) == {"pk", "list_key", "list_position"}
        query["ExclusiveStartKey"] = response["LastEvaluatedKey"]
    assert seen == [f"job_{i}" for i in reversed(range(7))] and pages >= 3
    bounded = ddb.query(
        **{
            **{k: v for k, v in query.items() if k != "ExclusiveStartKey"},
            "KeyConditionExpression": "list_key = :k AND list_position < :before",
            "ExpressionAttributeValues": serialize(
                {":k": tenant.id, ":before": f"{1_800_000_000_004:013d}#job_4"}
            ),
        }
    )
    assert [deserialize(raw)["job_id"] for raw in bounded["Items"]] == ["job_3", "job_2", "job_1"]


def job_service(tenant: Tenant) -> JobService:
    return bootstrap.job_service(tenant)


def test_jobs_created_concurrently_by_two_tenants_list_once_each_across_pages(
    stack: StackDescription, cursors: CursorCodec
) -> None:
    a, b = fresh_tenant("a"), fresh_tenant("b")

    def create(args: tuple[Tenant, int]) -> tuple[str, str]:
        tenant, i = args
        created = job_service(tenant).create(
            f"k{i}", JobRequest(message=f"job {i}", model="sim-fast", max_tokens=8)
        )
        return tenant.id, created.job.job_id

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(create, [(a, i) for i in range(11)] + [(b, i) for i in range(9)]))
    ids = {t.id: {job for owner, job in made if owner == t.id} for t in (a, b)}
    for tenant in (a, b):
        service = job_service(tenant)
        pages = every_page(lambda **q: service.list_jobs(cursors, **q), limit=3)  # noqa: B023
        listed = [e["job_id"] for p in pages for e in p]
        assert len(listed) == len(set(listed)) == len(ids[tenant.id])
        assert set(listed) == ids[tenant.id]
        created = [e["created_at"] for p in pages for e in p]
        assert created == sorted(created, reverse=True)
        assert all("output" not in e for p in pages for e in p)
        assert all(len(p) == 3 for p in pages[:-1])


def test_the_status_index_follows_every_status_change(stack: StackDescription, cursors: CursorCodec) -> None:
    tenant = fresh_tenant("status")
    service = job_service(tenant)
    ids = [
        service.create(f"k{i}", JobRequest(message=f"{i}", model="sim-fast", max_tokens=8)).job.job_id
        for i in range(6)
    ]
    store = bootstrap._job_tables(tenant, bootstrap.settings())[0]
    now = int(time.time() * 1000)
    store.take_lease(ids[0], "lease-0", now, now + 30_000)
    store.renew_lease(
        ids[0],
        "lease-0",
        now + 30_000,
        Progress(tokens_generated=3, last_sequence_id=1, chunks_written=1),
        None,
    )
    service.cancel(ids[1])
    service.cancel(ids[2])

    def statuses(status: str) -> list[str]:
        return [
            e["job_id"]
            for p in every_page(lambda **q: service.list_jobs(cursors, **q), status=status, limit=1)
            for e in p
        ]

    assert statuses("running") == [ids[0]]
    assert statuses("cancelled") == [ids[2], ids[1]]
    assert statuses("queued") == [ids[5], ids[4], ids[3]]
    assert statuses("completed") == []
    [running] = service.list_jobs(cursors, status="running").data
    assert running["progress"]["tokens_generated"] == 3  # the worker's last renewal, from the index
    with pytest.raises(InvalidRequest):
        service.list_jobs(cursors, status="finished")


def test_items_without_a_list_position_are_not_listed(stack: StackDescription, cursors: CursorCodec) -> None:
    """Jobs stored before the list index existed carry no list attributes: they are in no index."""
    tenant = fresh_tenant("legacy")
    settings = bootstrap.settings()
    table = ScopedTable(aws.dynamodb(settings), settings.jobs_table, TenantScope(tenant))
    table.put(
        "job",
        "job_legacy",
        {"job_id": "job_legacy", "status": "completed", "created_at": "2026-01-01T00:00:00.000Z"},
    )
    service = job_service(tenant)
    new = service.create("k", JobRequest(message="new", model="sim-fast", max_tokens=8)).job.job_id
    assert [e["job_id"] for e in service.list_jobs(cursors).data] == [new]


def test_contexts_list_newest_first_across_pages_and_keep_their_place_when_patched(
    stack: StackDescription, cursors: CursorCodec
) -> None:
    a, b = fresh_tenant("ctx-a"), fresh_tenant("ctx-b")
    service_a, service_b = bootstrap.context_service(a), bootstrap.context_service(b)
    ids = []
    for i in range(5):
        ids.append(
            service_a.create(CreateContextRequest(files=[FileIn(path=f"f{i}.py", content=f"x = {i}\n")]))[
                "context_id"
            ]
        )
    other = service_b.create(CreateContextRequest(files=[FileIn(path="o.py", content="o")]))["context_id"]
    service_a.patch(ids[0], PatchContextRequest(upsert=[FileIn(path="g.py", content="g")]))
    pages = every_page(lambda **q: service_a.list_contexts(a, cursors, **q), limit=2)
    listed = [e["context_id"] for p in pages for e in p]
    assert sorted(listed) == sorted(ids) and len(listed) == 5 and other not in listed
    created = [e["created_at"] for p in pages for e in p]
    assert created == sorted(created, reverse=True)
    entry = next(e for p in pages for e in p if e["context_id"] == ids[0])
    assert entry["version"] == 2 and entry["file_count"] == 2 and "files" not in entry
    cursor = service_a.list_contexts(a, cursors, limit=1).next_cursor
    with pytest.raises(InvalidRequest, match="not issued for this tenant"):
        service_b.list_contexts(b, cursors, cursor=cursor)


def test_a_status_filter_without_the_status_index_is_a_503_with_a_way_out(stack: StackDescription) -> None:
    """A stack upgraded with JobsStatusIndex=disabled (CloudFormation adds one index per update)."""
    from spool_core.adapters.jobs import DynamoJobStore
    from spool_core.errors import DependencyUnavailable

    settings = bootstrap.settings()
    ddb = aws.dynamodb(settings)
    name = f"jobs-without-status-index-{uuid.uuid4().hex[:8]}"
    keys = [("pk", "HASH")]
    ddb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": n, "AttributeType": "S"} for n in ("pk", "list_key", "list_position")
        ],
        KeySchema=[{"AttributeName": n, "KeyType": k} for n, k in keys],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "ListIndex",
                "KeySchema": [
                    {"AttributeName": "list_key", "KeyType": "HASH"},
                    {"AttributeName": "list_position", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )
    scope = TenantScope(fresh_tenant("upgrading"))
    store = DynamoJobStore(ScopedTable(ddb, name, scope), ScopedTable(ddb, settings.usage_table, scope), 3600)
    assert store.list_for_tenant(None, 5, None) == []
    with pytest.raises(DependencyUnavailable) as raised:
        store.list_for_tenant("running", 5, None)
    assert "List without status" in raised.value.suggestions[0]
