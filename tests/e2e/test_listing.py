"""GET /v1/jobs and GET /v1/contexts through the embedded stack, with two tenants (dev keys): every
item of the caller exactly once across pages, newest first, none of the other tenant's, the status
filter, and every bad query parameter or cursor a 400 in the envelope."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.conftest import DEV_KEY, OTHER_KEY, RunningStack

DEADLINE_SECONDS = 120


def create_job(stack: RunningStack, key: str, body: dict[str, Any]) -> str:
    """POST /v1/jobs, waiting out 429s (the tenant's concurrency limit) within a generous deadline."""
    idempotency = str(uuid.uuid4())
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        status, headers, answer = stack.request(
            "POST", "/v1/jobs", body=body, key=key, headers={"Idempotency-Key": idempotency}
        )
        if status in (200, 202):
            return str(answer["job_id"])
        assert status == 429 and time.monotonic() < deadline, (status, answer)
        time.sleep(min(float(headers.get("Retry-After", "1")), 2.0))


def pages(stack: RunningStack, path: str, key: str, **query: Any) -> Iterator[list[dict[str, Any]]]:
    cursor: str | None = None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        status, _headers, body = stack.request("GET", f"{path}?{urlencode(params)}", key=key)
        assert status == 200, body
        assert set(body) == {"data", "next_cursor"}
        yield body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            return


def listed(stack: RunningStack, path: str, key: str, **query: Any) -> list[dict[str, Any]]:
    return [entry for page in pages(stack, path, key, **query) for entry in page]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_each_tenant_lists_its_own_jobs_once_newest_first_across_small_pages(dev_stack: RunningStack) -> None:
    body = {"message": "list me", "model": "sim-fast", "max_tokens": 8}
    work = [(DEV_KEY, i) for i in range(9)] + [(OTHER_KEY, i) for i in range(7)]
    with ThreadPoolExecutor(8) as pool:  # both tenants create at the same time
        made = list(
            pool.map(lambda w: (w[0], create_job(dev_stack, w[0], {**body, "message": f"{w}"})), work)
        )
    mine = {key: [job for owner, job in made if owner == key] for key in (DEV_KEY, OTHER_KEY)}

    for key, other in ((DEV_KEY, OTHER_KEY), (OTHER_KEY, DEV_KEY)):
        # Small pages over the newest jobs (this test's are the newest), then the whole listing.
        seen: list[str] = []
        sizes: list[int] = []
        for page in pages(dev_stack, "/v1/jobs", key, limit=4):
            sizes.append(len(page))
            seen.extend(entry["job_id"] for entry in page)
            assert all("output" not in entry for entry in page)
            if set(mine[key]) <= set(seen):
                break
        assert set(mine[key]) <= set(seen) and all(size == 4 for size in sizes[:-1])
        everything = listed(dev_stack, "/v1/jobs", key, limit=100)
        ids = [entry["job_id"] for entry in everything]
        assert len(ids) == len(set(ids)), "a job was listed twice"
        assert set(mine[key]) <= set(ids) and not set(mine[other]) & set(ids)
        assert seen == ids[: len(seen)]  # small pages and large ones agree
        created = [entry["created_at"] for entry in everything]
        assert created == sorted(created, reverse=True)
        for job_id in mine[key][:2]:  # each is the tenant's own: GET answers it
            assert dev_stack.request("GET", f"/v1/jobs/{job_id}?output=false", key=key)[0] == 200


def test_the_status_filter_follows_the_jobs(dev_stack: RunningStack) -> None:
    done = [
        create_job(dev_stack, DEV_KEY, {"message": f"s{i}", "model": "sim-fast", "max_tokens": 8})
        for i in range(3)
    ]
    slow = create_job(dev_stack, DEV_KEY, {"message": "slow", "model": "sim-realtime", "max_tokens": 2000})
    status, _, _cancelled = dev_stack.request("POST", f"/v1/jobs/{slow}/cancel", key=DEV_KEY)
    assert status == 200

    def statuses(status: str) -> set[str]:
        return {e["job_id"] for e in listed(dev_stack, "/v1/jobs", DEV_KEY, status=status, limit=100)}

    wait_for(lambda: set(done) <= statuses("completed"), "the jobs to complete")
    wait_for(lambda: slow in statuses("cancelled"), "the cancelled job")
    completed = listed(dev_stack, "/v1/jobs", DEV_KEY, status="completed", limit=2)
    assert all(entry["status"] == "completed" and "output" not in entry for entry in completed)
    assert not set(done) & statuses("queued") and slow not in statuses("completed")
    assert not set(done) & {e["job_id"] for e in listed(dev_stack, "/v1/jobs", OTHER_KEY, status="completed")}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=done", "status"),
        ("status=COMPLETED", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("cursor=not-a-cursor", "cursor"),
    ],
)
def test_bad_query_parameters_are_400s_in_the_envelope(
    dev_stack: RunningStack, query: str, field: str
) -> None:
    status, _headers, body = dev_stack.request("GET", f"/v1/jobs?{query}", key=DEV_KEY)
    assert status == 400, body
    error = body["error"]
    assert error["code"] == "invalid_request" and error["suggestions"] and error["request_id"]
    assert field in str(error["details"])
    if field == "status":
        assert "queued, running, completed, failed, cancelled" in error["suggestions"][0]


def test_a_cursor_is_bound_to_its_tenant_and_cannot_be_altered(dev_stack: RunningStack) -> None:
    for i in range(3):
        create_job(dev_stack, DEV_KEY, {"message": f"c{i}", "model": "sim-fast", "max_tokens": 8})
    status, _, first = dev_stack.request("GET", "/v1/jobs?limit=1", key=DEV_KEY)
    cursor = first["next_cursor"]
    assert status == 200 and cursor
    status, _, body = dev_stack.request("GET", f"/v1/jobs?limit=1&cursor={cursor}", key=OTHER_KEY)
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert "tenant" in body["error"]["message"]
    payload, _, signature = cursor.partition(".")
    altered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + signature
    status, _, body = dev_stack.request("GET", f"/v1/jobs?limit=1&cursor={altered}", key=DEV_KEY)
    assert status == 400 and body["error"]["code"] == "invalid_request"
    status, _, body = dev_stack.request(
        "GET", f"/v1/jobs?limit=1&status=completed&cursor={cursor}", key=DEV_KEY
    )
    assert status == 400 and "filter" in body["error"]["suggestions"][0]
    status, _, second = dev_stack.request("GET", f"/v1/jobs?limit=1&cursor={cursor}", key=DEV_KEY)
    assert status == 200 and second["data"][0]["job_id"] != first["data"][0]["job_id"]
    status, _, body = dev_stack.request("GET", f"/v1/contexts?cursor={cursor}", key=DEV_KEY)
    assert status == 400, "a jobs cursor does not page contexts"


def test_contexts_page_likewise(dev_stack: RunningStack) -> None:
    def create(key: str, i: int) -> str:
        files = [{"path": f"src/f{i}.py", "content": f"x = {i}\n"}, {"path": "README", "content": "r"}]
        status, _, body = dev_stack.request("POST", "/v1/contexts", body={"files": files}, key=key)
        assert status == 201, body
        return str(body["context_id"])

    with ThreadPoolExecutor(6) as pool:
        mine = list(pool.map(lambda i: create(DEV_KEY, i), range(7)))
        theirs = list(pool.map(lambda i: create(OTHER_KEY, i), range(3)))
    seen: list[dict[str, Any]] = []
    for page in pages(dev_stack, "/v1/contexts", DEV_KEY, limit=3):
        assert len(page) <= 3
        seen.extend(page)
        if set(mine) <= {e["context_id"] for e in seen}:
            break
    everything = listed(dev_stack, "/v1/contexts", DEV_KEY, limit=100)
    ids = [e["context_id"] for e in everything]
    assert len(ids) == len(set(ids)) and set(mine) <= set(ids) and not set(theirs) & set(ids)
    assert [e["context_id"] for e in seen] == ids[: len(seen)]
    assert [e["created_at"] for e in everything] == sorted(
        (e["created_at"] for e in everything), reverse=True
    )
    entry = next(e for e in everything if e["context_id"] == mine[0])
    assert "files" not in entry and entry["file_count"] == 2 and entry["expired"] is False
    status, _, body = dev_stack.request("GET", "/v1/contexts?limit=101", key=DEV_KEY)
    assert status == 400 and body["error"]["code"] == "invalid_request"
