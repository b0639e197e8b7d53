"""Concurrent distinct requests through the stack: each is processed with its own headers and body
(every invocation has its own execution environment), and tenants never see each other's data."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.e2e.conftest import DEV_KEY, OTHER_KEY, RunningStack

ROUNDS = 2
REQUESTS = 40
CLIENT_THREADS = 16


def test_forty_concurrent_creates_with_distinct_keys_are_each_their_own_request(
    dev_stack: RunningStack,
) -> None:
    for round_ in range(ROUNDS):
        concurrent_creates(dev_stack, round_)


def concurrent_creates(stack: RunningStack, round_: int) -> None:
    keys = [str(uuid.uuid4()) for _ in range(REQUESTS)]
    bodies = [
        {"message": f"round {round_}, request {i}", "model": "sim-fast", "max_tokens": 8}
        for i in range(REQUESTS)
    ]

    def create(i: int, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        status, _, answer = stack.request(
            "POST", "/v1/jobs", body=body or bodies[i], headers={"Idempotency-Key": keys[i]}
        )
        return status, answer

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        results = list(pool.map(create, range(REQUESTS)))
    assert {status for status, _ in results} <= {202, 429}, [b for s, b in results if s not in {202, 429}]
    created = {i: body["job_id"] for i, (status, body) in enumerate(results) if status == 202}
    assert created, "no job was admitted"
    assert len(set(created.values())) == len(created)

    def check(i: int) -> None:
        # The key names this request's job, and the job holds this request's body.
        status, body = create(i)
        assert status in {200, 409}
        job = body if status == 200 else body["error"]["details"]
        assert job["job_id"] == created[i]
        status, other = create(i, {**bodies[i], "max_tokens": 9})
        assert (status, other["error"]["details"]["job_id"]) == (422, created[i])

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(check, created))


def test_two_tenants_hammering_their_own_contexts_never_see_each_others(dev_stack: RunningStack) -> None:
    run = uuid.uuid4().hex[:8]

    def own_work(task: tuple[str, int]) -> tuple[str, str, str]:
        key, i = task
        path = f"{run}/{key}/{i}.txt"
        status, _, created = dev_stack.request(
            "POST", "/v1/contexts", body={"files": [{"path": path, "content": f"{key} {i}"}]}, key=key
        )
        assert status == 201, created
        status, _, read = dev_stack.request("GET", f"/v1/contexts/{created['context_id']}", key=key)
        assert status == 200
        assert [f["path"] for f in read["files"]] == [path]  # this request's own context
        return key, created["context_id"], path

    tasks = [(key, i) for i in range(REQUESTS // 2) for key in (DEV_KEY, OTHER_KEY)]
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        owned = list(pool.map(own_work, tasks))
    for key, context_id, _ in owned:
        stranger = OTHER_KEY if key == DEV_KEY else DEV_KEY
        status, _, error = dev_stack.request("GET", f"/v1/contexts/{context_id}", key=stranger)
        assert (status, error["error"]["code"]) == (404, "context_not_found")
