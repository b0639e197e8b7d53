"""Pages of the chunk log (``GET /v1/jobs/{id}/chunks``, resume, and the SSE/OpenAI streams that
follow the log): the log is read first and only the job's status beside it, never the whole job item;
a page that sees the job ended holds every chunk written before the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from spool_core.jobs.errors import JobNotFound
from spool_core.jobs.model import Chunk, Job, JobRequest, Status
from spool_core.jobs.pages import STATUS_FRESH_SECONDS, ChunkPages
from spool_core.jobs.ports import LogPage
from tests.ledger import JobWorld


class CountingStore:
    """The tenant's store, counting the reads a page makes; ``hold_back`` makes the first log query
    miss the chunks after that sequence id (as if they were written just after it)."""

    def __init__(self, store: Any, hold_back: int | None = None) -> None:
        self._store = store
        self.hold_back = hold_back
        self.reads: list[str] = []

    def get(self, job_id: str) -> Job | None:
        self.reads.append("get")
        job: Job | None = self._store.get(job_id)
        return job

    def status(self, job_id: str) -> Status | None:
        self.reads.append("status")
        status: Status | None = self._store.status(job_id)
        return status

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        self.reads.append("after")
        found: list[Chunk] = self._store.after(job_id, after, limit)
        return found

    def page(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> LogPage:
        self.reads.append("page" if consistent else "page~")
        found: LogPage = self._store.page(job_id, after, limit)
        if self.hold_back is not None:  # this read ran before the rest was written (and the end)
            found = LogPage([c for c in found.chunks if c.sequence_id <= self.hold_back])
            self.hold_back = None
        return found

    def last(self, job_id: str) -> Chunk | None:
        last: Chunk | None = self._store.last(job_id)
        return last

    def all(self, job_id: str) -> Iterator[Chunk]:
        chunks: Iterator[Chunk] = self._store.all(job_id)
        return chunks


def service(world: JobWorld, store: CountingStore) -> ChunkPages:
    def sleep(seconds: float) -> None:
        world.clock.now += seconds

    return ChunkPages(store, store, clock=world.clock, sleep=sleep)  # type: ignore[arg-type]


def create(world: JobWorld, key: str = "k", tenant: str = "acme") -> str:
    request = JobRequest.model_validate({"message": "Explain", "model": "sim-fast", "max_tokens": 200})
    job_id: str = world.service(tenant).create(key, request).job.job_id
    return job_id


def test_a_page_reads_the_log_and_the_status_never_the_job_item() -> None:
    world = JobWorld()
    job_id = create(world)
    world.runner().run(job_id)
    store = CountingStore(world.ledger.tenant("acme"))
    page = service(world, store).chunks(job_id, after=0, limit=2)
    assert [c["sequence_id"] for c in page["chunks"]] == [1, 2]
    assert (page["status"], page["done"], page["next_after"]) == ("completed", False, 2)  # more remain
    assert "get" not in store.reads
    rest = service(world, store).chunks(job_id, after=2, limit=1000)
    assert rest["done"] and rest["chunks"][-1]["sequence_id"] == rest["next_after"] > 2


def test_chunks_written_between_the_log_query_and_the_status_read_are_on_the_page() -> None:
    world = JobWorld()
    job_id = create(world)
    world.runner().run(job_id)
    everything = list(world.ledger.tenant("acme").all(job_id))
    store = CountingStore(world.ledger.tenant("acme"), hold_back=2)  # the query ran before chunk 3
    page = service(world, store).chunks(job_id, after=0, limit=1000)
    assert [c["sequence_id"] for c in page["chunks"]] == [c.sequence_id for c in everything]
    assert page["done"] and page["next_after"] == everything[-1].sequence_id
    assert store.reads == ["page~", "status", "page"]  # the end seen from the status: read it all again


def test_the_end_mark_ends_a_page_from_the_log_read_alone() -> None:
    world = JobWorld()
    job_id = create(world)
    world.runner().run(job_id)
    store = CountingStore(world.ledger.tenant("acme"))
    page = service(world, store).chunks(job_id, after=0, limit=1000)
    assert page["done"] and page["status"] == "completed"
    assert store.reads == ["page~"]  # no status read, no second read: the mark comes after every chunk


def test_an_ended_job_seen_on_an_empty_poll_answers_every_chunk_then_done() -> None:
    world = JobWorld()
    job_id = create(world)
    world.runner().run(job_id)
    store = CountingStore(world.ledger.tenant("acme"), hold_back=0)  # the query saw nothing yet
    page = service(world, store).chunks(job_id, after=0, limit=1000, wait=5)
    assert page["done"] and len(page["chunks"]) == len(list(world.ledger.tenant("acme").all(job_id)))


def test_a_waiting_poll_of_a_silent_job_ends_at_its_deadline_empty() -> None:
    world = JobWorld()
    job_id = create(world)
    now = world.clock.ms()
    world.ledger.tenant("acme").take_lease(job_id, "a-worker", now, now + 30_000)  # started, silent
    store = CountingStore(world.ledger.tenant("acme"))
    started = world.clock.now
    page = service(world, store).chunks(job_id, after=0, wait=2)
    assert (page["status"], page["chunks"], page["done"], page["next_after"]) == ("running", [], False, 0)
    assert world.clock.now - started >= 2
    assert "get" not in store.reads
    # The log at every look (eventually consistent); the status at most every STATUS_FRESH_SECONDS.
    assert store.reads.count("page~") > store.reads.count("status") >= 1
    assert store.reads.count("status") <= 2 / STATUS_FRESH_SECONDS + 1


def test_a_job_that_ends_while_a_poll_waits_answers_its_chunks_and_done() -> None:
    world = JobWorld()
    job_id = create(world)
    store = CountingStore(world.ledger.tenant("acme"))
    reader = service(world, store)

    def sleep(seconds: float) -> None:
        if world.clock.now - started > 0.3:  # the worker runs the whole job while the poll waits
            world.runner().run(job_id)
        world.clock.now += seconds

    reader._sleep = sleep
    started = world.clock.now
    pages = [reader.chunks(job_id, after=0, limit=1000, wait=20)]
    while not pages[-1]["done"]:
        pages.append(reader.chunks(job_id, after=pages[-1]["next_after"], limit=1000, wait=20))
    everything = list(world.ledger.tenant("acme").all(job_id))
    assert pages[-1]["status"] == "completed" and len(pages) <= 2
    assert pages[0]["status"] in {"running", "completed"}  # never "queued" beside chunks
    assert [c["sequence_id"] for p in pages for c in p["chunks"]] == [c.sequence_id for c in everything]
    assert world.clock.now - started < 1  # the end was seen within a status read's freshness


@pytest.mark.parametrize("job_id", ["job_" + "x" * 26, "not-an-id"])
def test_an_unknown_job_is_not_found(job_id: str) -> None:
    world = JobWorld()
    with pytest.raises(JobNotFound):
        service(world, CountingStore(world.ledger.tenant("acme"))).chunks(job_id)


def test_another_tenants_job_is_not_found() -> None:
    world = JobWorld()
    job_id = create(world, tenant="other")
    world.runner("other").run(job_id)
    with pytest.raises(JobNotFound):
        service(world, CountingStore(world.ledger.tenant("acme"))).chunks(job_id)
