"""The embedded stack at rest and at its start: the job path is warm before `ready`, an idle stack's
stream pollers wait on moto instead of polling, one SQS poller per queue runs as many invocations as
the function may, and a job goes through."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from spool.devstack.stack import EmbeddedStack
from spool.devstack.streams import StreamChanges
from tests.support import ROOT, wait_for

TEMPLATE = ROOT / "template.yaml"


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack(port=0, ws_port=0, template_path=TEMPLATE, workers=3) as running:
        yield running


def call(stack: EmbeddedStack, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - loopback
        stack.base_url + path, data=None if body is None else json.dumps(body).encode(), method=method
    )
    request.add_header("Authorization", f"Bearer {stack.api_key}")
    request.add_header("Content-Type", "application/json")
    request.add_header("Idempotency-Key", str(uuid.uuid4()))
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())


def test_the_job_path_is_warm_before_ready(stack: EmbeddedStack) -> None:
    for name in ("AuthorizerFunction", "JobsFunction", "WorkerFunction", "FanoutFunction", "EventsFunction"):
        assert stack.functions[name].reports, f"{name} served nothing before ready"


def test_the_warm_up_ran_a_real_job_of_its_own_tenant_and_left_no_key(stack: EmbeddedStack) -> None:
    from spool.devstack.stack import WARM_UP_TENANT
    from spool_core import bootstrap
    from spool_core.tenancy import Tenant

    keys = bootstrap.api_keys()
    assert keys.list_keys(Tenant(WARM_UP_TENANT)) == []  # the key it ran with is gone
    assert call(stack, "GET", "/v1/jobs?limit=100")["data"] == []  # nothing in the developer's history
    key, record = keys.create(Tenant(WARM_UP_TENANT), description="test: read the warm-up's job")
    try:
        request = urllib.request.Request(  # noqa: S310 - loopback
            stack.base_url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            jobs = json.loads(response.read())["data"]
    finally:
        keys.revoke(record.key_id)
    assert [job["status"] for job in jobs] == ["completed"]


def test_one_poller_per_queue_with_the_functions_concurrency(stack: EmbeddedStack) -> None:
    queues = sorted(source._queue_arn.rsplit(":", 1)[-1] for source in stack._sources)
    assert len(queues) == len(set(queues))  # one per queue
    assert stack.workers == 3
    assert all(source.concurrency == 3 for source in stack._sources)


def test_an_idle_stack_reads_its_streams_only_after_writes(stack: EmbeddedStack) -> None:
    assert stack.description is not None
    changes = StreamChanges(stack.description.endpoint_url, wait_seconds=2)
    polls, written = sum(p.polls for p in stack._pollers), changes.wait(-1)
    changes.wait(written)  # up to 2 s, over which pollers reading every 50 ms would read 80 times
    # At most one read per shard per write, whatever happens meanwhile (the sweeper may write).
    assert sum(p.polls for p in stack._pollers) - polls <= len(stack._pollers) * (
        changes.wait(-1) - written + 1
    )


def test_a_job_completes(stack: EmbeddedStack) -> None:
    job = call(stack, "POST", "/v1/jobs", {"message": "scale", "model": "sim-fast", "max_tokens": 30})

    def ended() -> dict[str, Any] | None:
        read: dict[str, Any] = call(stack, "GET", f"/v1/jobs/{job['job_id']}")
        return read if read["status"] in {"completed", "failed", "cancelled"} else None

    done = wait_for(ended, timeout=120, what="the job to end")
    assert done is not None
    assert done["status"] == "completed"
