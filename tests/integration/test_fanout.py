"""The fanout's ordering guarantee under concurrent senders, on real DynamoDB conditional writes."""

from __future__ import annotations

import threading
from typing import Any

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import ScopedTable
from spool_core.adapters.websocket import DynamoSubscriptionStore
from spool_core.jobs.model import Chunk, JobRequest
from spool_core.subscriptions import Fanout
from spool_core.tenancy import Tenant, TenantScope


class RecordingPusher:
    def __init__(self) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        with self._lock:
            self.messages.setdefault(connection_id, []).append(message)
        return True


def test_concurrent_senders_deliver_in_order_without_gaps_or_duplicates(stack: StackDescription) -> None:
    tenant = Tenant("fanout")
    config = bootstrap.settings()
    jobs, chunks = bootstrap._job_tables(tenant, config)
    service = bootstrap.job_service(tenant)
    job = service.create(
        "k", JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 10})
    ).job
    pusher = RecordingPusher()
    store = DynamoSubscriptionStore(
        ScopedTable(aws.dynamodb(config), config.connections_table, TenantScope(tenant))
    )

    def fanout() -> Fanout:  # each sender is its own "invocation", with its own lock owner
        return Fanout(jobs, chunks, store, pusher)

    for seq in range(1, 6):
        chunks.append(
            job.job_id, Chunk(sequence_id=seq, text=f"<{seq}>", created_at="t", tokens=1, tokens_total=seq)
        )
    fanout().subscribe(job.job_id, "conn-a", 2)

    def writer() -> None:
        for seq in range(6, 41):
            chunks.append(
                job.job_id,
                Chunk(sequence_id=seq, text=f"<{seq}>", created_at="t", tokens=1, tokens_total=seq),
            )
            fanout().deliver(job.job_id)

    senders = [threading.Thread(target=writer)] + [
        threading.Thread(target=lambda: [fanout().deliver(job.job_id) for _ in range(10)]) for _ in range(3)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    service.cancel(job.job_id)  # the job ends (it never started)
    fanout().deliver(job.job_id)

    received = pusher.messages["conn-a"]
    ids = [m["sequence_id"] for m in received if m["type"] == "chunk"]
    assert ids == list(range(3, 41))  # after 2, in order, none twice, none missing
    assert received[-1]["type"] == "done"
    assert sum(1 for m in received if m["type"] == "done") == 1
    assert store.for_job(job.job_id) == []  # the finished subscription is gone
