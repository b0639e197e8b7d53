"""Listing jobs and contexts with in-memory ports: pages, order, tenancy, filters and cursors."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from spool_core.contexts.model import SUMMARY_FIELDS as CONTEXT_FIELDS
from spool_core.contexts.model import CreateContextRequest, FileIn
from spool_core.contexts.service import ContextService
from spool_core.errors import ConfigurationError, InvalidRequest
from spool_core.jobs.model import SUMMARY_FIELDS as JOB_FIELDS
from spool_core.jobs.model import JobRequest, Progress
from spool_core.jobs.service import JobService
from spool_core.limits.model import TenantLimits
from spool_core.listing import MAX_LIMIT, CursorCodec, Page, cursor_codec, position
from spool_core.settings import Settings
from spool_core.tenancy import Tenant
from tests.fakes import (
    ListingJobStore,
    MemoryBlobIndex,
    MemoryBlobStore,
    MemoryContextTable,
    MemoryManifestStore,
    MemoryUploadStore,
)
from tests.ledger import JobWorld
from tests.support import ROOT

CURSORS = CursorCodec(b"unit-test-secret")


def job_service(world: JobWorld, tenant: str) -> JobService:
    store = world.ledger.tenant(tenant)
    return JobService(
        Tenant(tenant),
        ListingJobStore(store),  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        lambda: world._contexts,
        world.catalog,
        world.limiter(tenant),
        clock=world.clock,
        sleep=lambda _: None,
        events_link=lambda job_id: f"http://x/v1/jobs/{job_id}/events?token=t",
    )


@pytest.fixture
def world() -> JobWorld:
    return JobWorld(limits=TenantLimits(10**8, 10**10, 10_000))


def create(service: JobService, n: int, world: JobWorld, step: float = 0.01) -> list[str]:
    ids = []
    for i in range(n):
        world.clock.now += step
        created = service.create(f"key-{i}", JobRequest(message=f"job {i}", model="sim-fast", max_tokens=8))
        ids.append(created.job.job_id)
    return ids


def every_page(list_page: Any, **query: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        page: Page = list_page(cursor=cursor, **query)
        pages.append(page.data)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def test_every_job_of_the_tenant_once_newest_first_across_small_pages(world: JobWorld) -> None:
    a, b = job_service(world, "tenant-a"), job_service(world, "tenant-b")
    ids_a = create(a, 23, world)
    ids_b = create(b, 7, world)

    pages = every_page(lambda **q: a.list_jobs(CURSORS, **q), limit=5)
    listed = [entry["job_id"] for page in pages for entry in page]
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    assert listed == list(reversed(ids_a))  # newest first, each once, none of tenant-b's
    assert not set(listed) & set(ids_b)
    assert all("output" not in entry and "files" not in entry for page in pages for entry in page)

    exact = every_page(lambda **q: b.list_jobs(CURSORS, **q), limit=7)
    assert [len(page) for page in exact] == [7]  # a page that ends the listing has no cursor


def test_jobs_created_in_the_same_millisecond_concurrently_page_exactly(world: JobWorld) -> None:
    a = job_service(world, "tenant-a")
    with ThreadPoolExecutor(8) as pool:  # the clock does not move: every job has one created_at
        created = list(
            pool.map(
                lambda i: a.create(f"k{i}", JobRequest(message="x", model="sim-fast", max_tokens=4)),
                range(30),
            )
        )
    ids = {c.job.job_id for c in created}
    listed = [
        e["job_id"] for page in every_page(lambda **q: a.list_jobs(CURSORS, **q), limit=4) for e in page
    ]
    assert sorted(listed) == sorted(ids) and len(listed) == 30
    assert listed == sorted(listed, reverse=True)  # ties on the millisecond are broken by id


def test_an_entry_is_the_job_resource_without_output_and_reads_no_chunk(world: JobWorld) -> None:
    a = job_service(world, "tenant-a")
    [job_id] = create(a, 1, world)
    store = world.ledger.tenant("tenant-a")
    job = store.take_lease(job_id, "lease-1", world.clock.ms(), world.clock.ms() + 30_000)
    store.renew_lease(
        job_id,
        "lease-1",
        world.clock.ms() + 30_000,
        Progress(tokens_generated=7, last_sequence_id=2, chunks_written=2),
        "2027-01-15T08:00:00.000Z",
    )
    assert job.status == "running"

    reads: list[str] = []
    original = store.__class__.last

    def counting_last(self: Any, job_id: str) -> Any:
        reads.append(job_id)
        return original(self, job_id)

    store.__class__.last = counting_last  # type: ignore[method-assign]
    try:
        [entry] = a.list_jobs(CURSORS).data
    finally:
        store.__class__.last = original  # type: ignore[method-assign]
    assert reads == []
    assert entry["status"] == "running"
    assert entry["progress"] == {"tokens_generated": 7, "last_sequence_id": 2, "chunks_written": 2}
    assert entry["first_token_at"] == "2027-01-15T08:00:00.000Z"
    assert entry["links"]["events"].startswith(f"http://x/v1/jobs/{job_id}/events")
    expected = a.view(a.get(job_id), with_output=False, live=False)
    assert entry == expected and "output" not in entry


def test_status_filter_lists_only_that_status_and_pages_it(world: JobWorld) -> None:
    a = job_service(world, "tenant-a")
    ids = create(a, 12, world)
    cancelled = ids[::3]
    for job_id in cancelled:
        a.cancel(job_id)
    pages = every_page(lambda **q: a.list_jobs(CURSORS, **q), status="cancelled", limit=2)
    assert [e["job_id"] for p in pages for e in p] == list(reversed(cancelled))
    assert all(e["status"] == "cancelled" for p in pages for e in p)
    queued = [
        e["job_id"] for p in every_page(lambda **q: a.list_jobs(CURSORS, **q), status="queued") for e in p
    ]
    assert queued == [i for i in reversed(ids) if i not in cancelled]
    assert a.list_jobs(CURSORS, status="failed").body() == {"data": [], "next_cursor": None}
    assert len(a.list_jobs(CURSORS, status="").data) == 12  # an empty filter is no filter


@pytest.mark.parametrize("status", ["done", "QUEUED", "x" * 500])
def test_an_unknown_status_is_a_400_naming_the_statuses(world: JobWorld, status: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        job_service(world, "tenant-a").list_jobs(CURSORS, status=status)
    assert "queued, running, completed, failed, cancelled" in raised.value.suggestions[0]
    assert raised.value.details["fields"][0]["field"] == "status"
    assert len(raised.value.message) < 80


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_a_limit_out_of_range_is_a_400(world: JobWorld, limit: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        job_service(world, "tenant-a").list_jobs(CURSORS, limit=limit)
    assert raised.value.details["fields"][0]["max"] == MAX_LIMIT and raised.value.suggestions


def _tampered(cursor: str) -> str:
    payload, _, signature = cursor.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["p"] = "9" * 13 + "#job_zzz"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{forged}.{signature}"


def test_bad_tampered_foreign_and_mismatched_cursors_are_400s(world: JobWorld) -> None:
    a, b = job_service(world, "tenant-a"), job_service(world, "tenant-b")
    create(a, 3, world)
    create(b, 3, world)
    cursor_a = a.list_jobs(CURSORS, limit=1).next_cursor
    assert cursor_a is not None
    cursor_queued = a.list_jobs(CURSORS, limit=1, status="queued").next_cursor
    assert cursor_queued is not None
    bad = {
        "garbage": ("not-a-cursor", "not one this API issued"),
        "truncated": (cursor_a[:-3], "not one this API issued"),
        "tampered": (_tampered(cursor_a), "not one this API issued"),
        "other key": (
            CursorCodec(b"another deployment").encode(Tenant("tenant-a"), "jobs", "", "1"),
            "not one",
        ),
        "too long": (cursor_a + "A" * 2000, "not one this API issued"),
        "not ascii": ("é" * 10, "not one this API issued"),
    }
    for name, (cursor, message) in bad.items():
        with pytest.raises(InvalidRequest) as raised:
            a.list_jobs(CURSORS, cursor=cursor)
        assert message in raised.value.message, name
        assert raised.value.details["fields"][0]["field"] == "cursor" and raised.value.suggestions
    with pytest.raises(InvalidRequest, match="not issued for this tenant"):
        b.list_jobs(CURSORS, cursor=cursor_a)  # tenant A's cursor used by tenant B
    with pytest.raises(InvalidRequest, match="issued for status=queued, not no filter"):
        a.list_jobs(CURSORS, cursor=cursor_queued)
    with pytest.raises(InvalidRequest, match="issued for no filter, not status=queued"):
        a.list_jobs(CURSORS, cursor=cursor_a, status="queued")
    assert len(a.list_jobs(CURSORS, cursor=cursor_a).data) == 2  # the good one still works


def test_position_sorts_as_creation_and_is_unique() -> None:
    assert position("2026-11-27T07:00:00.001Z", "job_b") > position("2026-11-27T07:00:00.000Z", "job_z")
    assert position("2026-11-27T07:00:00.000Z", "job_b") > position("2026-11-27T07:00:00.000Z", "job_a")
    assert position("1970-01-01T00:00:00.000Z", "x") == "0000000000000#x"


def test_cursor_codec_needs_the_deployment_secret() -> None:
    env = {
        name: "x"
        for name in (
            "SPOOL_API_KEYS_TABLE",
            "SPOOL_CONTEXTS_TABLE",
            "SPOOL_JOBS_TABLE",
            "SPOOL_CHUNKS_TABLE",
            "SPOOL_BUCKET",
            "SPOOL_JOBS_QUEUE_URL",
            "SPOOL_DEAD_LETTER_QUEUE_URL",
            "SPOOL_USAGE_TABLE",
            "SPOOL_SYSTEM_TABLE",
            "SPOOL_CONNECTIONS_TABLE",
        )
    }
    with pytest.raises(ConfigurationError):
        cursor_codec(Settings.from_env(env))


# --------------------------------------------------------------------------- contexts
class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def context_service(table: MemoryContextTable, clock: Clock) -> ContextService:
    return ContextService(
        table, MemoryManifestStore(), MemoryBlobStore(), MemoryBlobIndex(), MemoryUploadStore(), clock=clock
    )


def test_contexts_page_newest_first_without_files_and_say_when_expired() -> None:
    clock, table = Clock(), MemoryContextTable()
    service = context_service(table, clock)
    tenant = Tenant("tenant-a")
    ids = []
    for i in range(7):
        clock.now += 1
        request = CreateContextRequest(
            files=[FileIn(path=f"f{i}.py", content="x = 1\n" * (i + 1))], ttl_seconds=10
        )
        ids.append(service.create(request)["context_id"])
    clock.now += 6  # the first ones have expired, the last ones not yet
    pages = every_page(lambda **q: service.list_contexts(tenant, CURSORS, **q), limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    entries = [e for p in pages for e in p]
    assert [e["context_id"] for e in entries] == list(reversed(ids))
    assert set(entries[0]) == {
        "context_id",
        "version",
        "expires_at",
        "size_bytes",
        "token_count",
        "file_count",
        "created_at",
        "updated_at",
        "expired",
    }
    assert [e["expired"] for e in entries] == [False] * 4 + [True] * 3
    assert entries[-1]["file_count"] == 1 and entries[-1]["size_bytes"] == 6

    jobs_cursor = CURSORS.encode(tenant, "jobs", "", pages[0][-1]["created_at"])
    with pytest.raises(InvalidRequest, match="contexts listing"):
        service.list_contexts(tenant, CURSORS, cursor=jobs_cursor)
    with pytest.raises(InvalidRequest):
        service.list_contexts(tenant, CURSORS, limit=0)


def test_a_patched_context_keeps_its_place() -> None:
    from spool_core.contexts.model import PatchContextRequest

    clock, table = Clock(), MemoryContextTable()
    service = context_service(table, clock)
    tenant = Tenant("tenant-a")
    first = service.create(CreateContextRequest(files=[FileIn(path="a.py", content="a")]))["context_id"]
    clock.now += 1
    second = service.create(CreateContextRequest(files=[FileIn(path="b.py", content="b")]))["context_id"]
    clock.now += 1
    service.patch(first, PatchContextRequest(upsert=[FileIn(path="c.py", content="c")]))
    entries = service.list_contexts(tenant, CURSORS).data
    assert [e["context_id"] for e in entries] == [second, first]
    assert entries[1]["version"] == 2 and entries[1]["file_count"] == 2


# --------------------------------------------------------------------------- the template
def test_the_list_indexes_project_exactly_the_summary_fields() -> None:
    from spool.devstack.template import Template

    template = Template.load(ROOT / "template.yaml")
    resources = template.resources_of_type("AWS::DynamoDB::Table")

    def index(table: str, name: str) -> dict[str, Any]:
        indexes = resources[table]["Properties"]["GlobalSecondaryIndexes"]
        # StatusIndex is conditional (JobsStatusIndex): {"Fn::If": [condition, index, AWS::NoValue]}
        unwrapped = [i["Fn::If"][1] if "Fn::If" in i else i for i in indexes]
        return next(i for i in unwrapped if i["IndexName"] == name)

    for table, name, fields in (
        ("JobsTable", "ListIndex", JOB_FIELDS),
        ("JobsTable", "StatusIndex", JOB_FIELDS),
        ("ContextsTable", "ListIndex", CONTEXT_FIELDS),
    ):
        projection = index(table, name)["Projection"]
        assert projection["ProjectionType"] == "INCLUDE"
        assert sorted(projection["NonKeyAttributes"]) == sorted(fields), (table, name)
    assert "output" not in JOB_FIELDS and "request" not in JOB_FIELDS


def test_a_summary_has_no_output_to_show(world: JobWorld) -> None:
    a = job_service(world, "tenant-a")
    [job_id] = create(a, 1, world)
    [listed] = ListingJobStore(world.ledger.tenant("tenant-a")).list_for_tenant(None, 1, None)
    assert listed.job.job_id == job_id
    with pytest.raises(TypeError):
        a.view(listed.job, with_output=True)


@pytest.mark.parametrize("setting", ["enabled", "disabled"])
def test_the_local_stack_decides_the_status_index_as_cloudformation_would(setting: str) -> None:
    from spool.devstack.provision import apply_conditions
    from spool.devstack.template import Template

    template = Template.load(ROOT / "template.yaml")
    parameters = template.parameter_values({"JobsStatusIndex": setting})
    jobs = apply_conditions(
        template.resources_of_type("AWS::DynamoDB::Table")["JobsTable"],
        template.body["Conditions"],
        parameters,
    )["Properties"]
    names = [i["IndexName"] for i in jobs["GlobalSecondaryIndexes"]]
    attributes = [a["AttributeName"] for a in jobs["AttributeDefinitions"]]
    enabled = setting == "enabled"
    assert names == ["PendingIndex", "ListIndex", *(["StatusIndex"] if enabled else [])]
    assert ("status_key" in attributes) is enabled
