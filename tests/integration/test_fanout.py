"""The fanout's guarantees on real DynamoDB conditional writes (moto, linearizable as the local stack
runs it): order, no gap, no duplicate and exactly one ``done`` under concurrent senders, a job that
ends between two chunks included; and the fanout function on stream batches."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import ScopedTable, serialize
from spool_core.adapters.websocket import DynamoDueEnds, DynamoSubscriptionStore
from spool_core.due_ends import DueEnd
from spool_core.events import done_data
from spool_core.jobs.model import END_SEQUENCE_ID, Chunk, EndMark, Job, JobRequest, Progress, Usage
from spool_core.subscriptions import LEASE_MS, Fanout, Subscription
from spool_core.tenancy import Tenant, TenantScope
from spool_core.units import now_ms
from tests.integration.test_keys_revocation import (  # noqa: F401 - the fixture
    RecordingGateway,
    connect,
    gateway,
    subscribe,
)
from tests.subscription_fakes import RecordingPusher
from tests.support import load_event
from tests.unit.test_fanout_recovery import DiesOnce, FailsOnce
from tests.unit.test_subscriptions import Clock, Killed, assert_complete_at_least_once

# Each run is a few hundred DynamoDB calls (~1 s on a loaded machine); the in-memory twin runs 200.
RACE_ITERATIONS = int(os.environ.get("SPOOL_FANOUT_RACE_ITERATIONS", "40"))


class Parts:
    """One tenant's job table, chunk log and subscriptions on the moto server."""

    def __init__(self, tenant: Tenant, pause: Callable[[], None] = lambda: None) -> None:
        config = bootstrap.settings()
        self.tenant = tenant
        self.jobs, self.chunks = bootstrap._job_tables(tenant, config)
        self.job_table = ScopedTable(aws.dynamodb(config), config.jobs_table, TenantScope(tenant))
        self.store = DynamoSubscriptionStore(
            ScopedTable(aws.dynamodb(config), config.connections_table, TenantScope(tenant))
        )
        self.pusher = RecordingPusher(pause)

    def fanout(self) -> Fanout:  # each sender is its own invocation, with its own lease owner
        return Fanout(self.jobs, self.chunks, self.store, self.pusher)

    def new_job(self) -> Job:
        job = Job(
            job_id=f"job_{uuid.uuid4().hex[:12]}",
            tenant_id=self.tenant.id,
            status="running",
            request=JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 10}),
            fingerprint="f",
            model_requested="sim-fast",
            model_resolved="sim-fast",
            created_at="2026-11-27T07:00:00Z",
            attempts=1,
        )
        self.job_table.put("job", job.job_id, job.model_dump(exclude_none=True))
        return job

    def append(self, job: Job, seq: int) -> Chunk:
        chunk = Chunk(sequence_id=seq, text=f"<{seq}>", created_at="t", tokens=1, tokens_total=seq)
        self.chunks.append(job.job_id, chunk)
        return chunk

    def end(self, job: Job, last: int) -> Job:
        """What the worker's end writes: the final status, progress, usage and cost (on the job as it
        is then: a subscribe may have marked it)."""
        current = self.jobs.get(job.job_id)
        assert current is not None
        ended = current.model_copy(
            update={
                "status": "completed",
                "progress": Progress(tokens_generated=last, last_sequence_id=last, chunks_written=last),
                "usage": Usage(estimated_tokens=10, input_tokens=3, output_tokens=last),
                "cost_nanos": 1000 * last,
            }
        )
        self.job_table.put("job", job.job_id, ended.model_dump(exclude_none=True))
        return ended


def test_the_chunk_stream_and_a_handler_deliver_in_order_without_gaps_or_duplicates(
    stack: StackDescription,
) -> None:
    parts = Parts(Tenant("fanout"))
    job = parts.new_job()
    for seq in range(1, 6):
        parts.append(job, seq)

    def stream() -> None:  # one delivery at a time, in order, as Lambda reads a shard
        for seq in range(6, 41):
            chunk = parts.append(job, seq)
            parts.fanout().deliver(job.job_id, chunks=[chunk])

    sender = threading.Thread(target=stream)
    sender.start()
    parts.fanout().subscribe(job.job_id, "conn-a", 2)  # while the stream delivers
    sender.join()
    parts.fanout().deliver(job.job_id, ended=EndMark.of(parts.end(job, 40)))

    received = parts.pusher.messages["conn-a"]
    ids = [m["sequence_id"] for m in received if m["type"] == "chunk"]
    assert ids == list(range(3, 41))  # after 2, in order, none twice, none missing
    assert received[-1]["type"] == "done"
    assert sum(1 for m in received if m["type"] == "done") == 1
    assert parts.store.for_job(job.job_id) == []  # the finished subscription is gone


@pytest.mark.parametrize("seed", range(RACE_ITERATIONS))
def test_a_job_ending_while_subscribers_join_ends_every_subscription_once(
    stack: StackDescription, seed: int
) -> None:
    """As the in-memory race (tests/unit/test_subscriptions.py), on DynamoDB: the chunk stream's
    deliveries in order on one thread, the worker marking chunks live from the flush after it saw a
    subscriber, subscribers joining before, during and after the job, the end mark behind the last
    chunk."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def pause() -> None:
        with lock:
            delay = rng.choice((0, 0, 0.001, 0.003))
        time.sleep(delay)

    parts = Parts(Tenant("fanout-race"), pause)
    job = parts.new_job()
    total = rng.randint(3, 6)
    joins = {"early": (0, rng.randint(0, 1)), "late": (rng.randint(1, total + 1), rng.randint(0, 2))}
    handlers: list[threading.Thread] = []

    def join(connection: str, after: int) -> None:
        handlers.append(
            threading.Thread(target=lambda: parts.fanout().subscribe(job.job_id, connection, after))
        )
        handlers[-1].start()

    join("early", joins["early"][1])
    live = False
    for seq in range(1, total + 1):
        if joins["late"][0] == seq:
            join("late", joins["late"][1])
        chunk = parts.append(job, seq)
        if live:
            parts.fanout().deliver(job.job_id, chunks=[chunk])
        live = live or bool(parts.jobs.signals(job.job_id).subscribed)  # the worker's check
    ended = parts.end(job, total)
    if ended.subscribed:
        parts.fanout().deliver(job.job_id, ended=EndMark.of(ended))
    if joins["late"][0] > total:
        join("late", joins["late"][1])
    for thread in handlers:
        thread.join(timeout=120)
        assert not thread.is_alive()

    for connection, (_, after) in joins.items():
        received = parts.pusher.messages[connection]
        assert [m["sequence_id"] for m in received if m["type"] == "chunk"] == list(
            range(after + 1, total + 1)
        )
        assert [m["type"] for m in received].count("done") == 1
        assert received[-1] == {"type": "done", **done_data(ended)}
    assert parts.store.for_job(job.job_id) == []


@pytest.mark.parametrize(
    "breaks",
    [
        pytest.param(lambda target: DiesOnce(target, at=2), id="dies-mid-push-again"),
        pytest.param(lambda target: FailsOnce(target, at=1), id="push-again-fails"),
    ],
)
def test_a_stream_delivery_that_took_over_a_dead_claim_and_broke_leaves_no_gap(
    stack: StackDescription, breaks: Callable[[RecordingPusher], RecordingPusher]
) -> None:
    """A handler claimed 1..3 and died; chunk 4's delivery takes over and pushes the claim again, and
    dies (or its push fails) on the way: its retry, then the end, still bring every chunk and done."""
    parts = Parts(Tenant("fanout-takeover"))
    job = parts.new_job()
    for seq in (1, 2, 3):
        parts.append(job, seq)
    ran_out = now_ms() - 1  # the dead handler's lease
    parts.store.put(Subscription(job.job_id, "conn-t", 0, sender="dead", sending_until_ms=ran_out))
    assert parts.store.claim(job.job_id, "conn-t", "dead", prev=0, new=3, until_ms=ran_out).applied
    four = parts.append(job, 4)
    broken = Fanout(parts.jobs, parts.chunks, parts.store, breaks(parts.pusher))
    with pytest.raises((Killed, ConnectionError)):
        broken.deliver(job.job_id, chunks=[four])
    parts.fanout().deliver(job.job_id, chunks=[four])  # Lambda runs the batch again
    parts.fanout().deliver(job.job_id, ended=EndMark.of(parts.end(job, 4)))
    assert_complete_at_least_once(parts.pusher.messages["conn-t"], 0, 4)
    assert parts.store.for_job(job.job_id) == []


def test_a_stream_delivery_that_took_over_a_dead_done_claim_and_died_still_sends_done(
    stack: StackDescription,
) -> None:
    parts = Parts(Tenant("fanout-takeover"))
    job = parts.new_job()
    parts.append(job, 1)
    ended = EndMark.of(parts.end(job, 1))
    ran_out = now_ms() - 1
    parts.store.put(Subscription(job.job_id, "conn-d", 0, sender="dead", sending_until_ms=ran_out))
    assert parts.store.claim(job.job_id, "conn-d", "dead", prev=0, new=1, until_ms=ran_out).applied
    parts.pusher.send("conn-d", {"type": "chunk", "job_id": job.job_id, "sequence_id": 1, "text": "<1>"})
    assert parts.store.claim_done(job.job_id, "conn-d", "dead", last=1, until_ms=ran_out).applied
    with pytest.raises(Killed):  # the end's delivery takes over and dies pushing done
        Fanout(parts.jobs, parts.chunks, parts.store, DiesOnce(parts.pusher, at=1)).deliver(
            job.job_id, ended=ended
        )
    parts.fanout().deliver(job.job_id, ended=ended)
    assert_complete_at_least_once(parts.pusher.messages["conn-d"], 0, 1)
    assert parts.store.for_job(job.job_id) == []


def stream_record(table: str, image: dict[str, Any], keys: dict[str, Any], seq: int) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(json.dumps(load_event("fanout")["Records"][0]))
    record["dynamodb"].update(Keys=serialize(keys), NewImage=serialize(image), SequenceNumber=str(seq))
    record["eventSourceARN"] = record["eventSourceARN"].replace("ChunksTable", table)
    return record


def test_the_fanout_function_pushes_a_batch_from_its_records_then_done(
    invoke: Any,
    stack: StackDescription,
    gateway: tuple[RecordingGateway, dict[str, str]],  # noqa: F811
) -> None:
    recording, env = gateway
    parts = Parts(Tenant("local"))
    from tests.integration.conftest import DEV_KEY

    connect(invoke, recording, env, "conn-batch", DEV_KEY)
    job = parts.new_job()
    subscribe(invoke, env, "conn-batch", job.job_id)
    pk = f"local#job#{job.job_id}"
    chunks = [parts.append(job, seq) for seq in (1, 2, 3)]
    records = [
        stream_record(
            "ChunksTable", {"pk": pk, **c.model_dump(exclude_none=True)}, {"pk": pk, "sequence_id": n}, n
        )
        for n, c in enumerate(chunks, start=1)
    ]
    other = f"local#job#job_{uuid.uuid4().hex[:12]}"  # a job nobody follows: one Query, nothing else
    records.insert(
        1,
        stream_record(
            "ChunksTable", {"pk": other, **chunks[0].model_dump()}, {"pk": other, "sequence_id": 1}, 9
        ),
    )
    assert invoke("FanoutFunction", {"Records": records}, environment=env) == {"batchItemFailures": []}
    assert [f["sequence_id"] for f in recording.frames["conn-batch"]] == [1, 2, 3]

    ended = parts.end(job, 3)
    mark = {"pk": pk, **EndMark.of(ended).model_dump(exclude_none=True), "live": True}
    end = stream_record("ChunksTable", mark, {"pk": pk, "sequence_id": END_SEQUENCE_ID}, 10)
    assert invoke("FanoutFunction", {"Records": [end]}, environment=env) == {"batchItemFailures": []}
    done = recording.frames["conn-batch"][-1]
    assert done == {"type": "done", **done_data(ended)}
    assert set(done) == {"type", "job_id", "status", "usage", "cost_usd", "error", "last_sequence_id"}
    assert parts.store.for_job(job.job_id) == []


def test_an_end_mark_touched_for_the_stream_goes_live_and_a_missing_one_is_not_made(
    stack: StackDescription,
) -> None:
    """``redeliver_end`` (a subscribe handler that stopped early hands an ended job back to the chunk
    stream): the existing end mark, even one written while nobody was subscribed, becomes live (the
    fanout's stream filter passes it) and changes (a new stream record); a job with no end mark gets
    none."""
    parts = Parts(Tenant("fanout"))
    job = parts.new_job()
    parts.append(job, 1)
    assert parts.chunks.redeliver_end(job.job_id) is False
    config = bootstrap.settings()
    marks = ScopedTable(aws.dynamodb(config), config.chunks_table, TenantScope(parts.tenant))
    assert marks.get("job", job.job_id, sort={"sequence_id": END_SEQUENCE_ID}) is None
    ended = EndMark.of(parts.end(job, 1))
    marks.put("job", job.job_id, {**ended.model_dump(exclude_none=True), "sequence_id": END_SEQUENCE_ID})
    assert parts.chunks.redeliver_end(job.job_id) is True
    assert parts.chunks.redeliver_end(job.job_id) is True
    mark = marks.get("job", job.job_id, sort={"sequence_id": END_SEQUENCE_ID})
    assert mark is not None and mark["live"] is True and mark["redeliveries"] == 2
    assert EndMark.model_validate(mark) == ended  # what the fanout reads from it is unchanged


def test_an_end_held_back_by_a_killed_handler_is_swept_from_the_index_and_delivered_again(
    stack: StackDescription,
) -> None:
    """On DynamoDB (moto): a subscription is in the due index from its creation; its handler dies
    outright mid-backlog of an ended job. Once the lease has run out the sweeper finds it in the index
    (which tenant, job and connection), touches the job's end mark, and the end's delivery takes the
    lease over and sends the rest and done; then nothing is due."""
    parts = Parts(Tenant("fanout-due"))
    job = parts.new_job()
    for seq in (1, 2, 3):
        parts.append(job, seq)
    ended = EndMark.of(parts.end(job, 3))
    config = bootstrap.settings()
    marks = ScopedTable(aws.dynamodb(config), config.chunks_table, TenantScope(parts.tenant))
    marks.put("job", job.job_id, {**ended.model_dump(exclude_none=True), "sequence_id": END_SEQUENCE_ID})
    clock = Clock()
    clock.now = now_ms()
    dying = Fanout(parts.jobs, parts.chunks, parts.store, DiesOnce(parts.pusher, at=2), clock_ms=clock)
    with pytest.raises(Killed):
        dying.subscribe(job.job_id, "conn-due", 0)
    (subscription,) = parts.store.for_job(job.job_id)
    lease = subscription.sending_until_ms
    assert subscription.end_due_ms == lease

    sweeper = bootstrap.due_end_sweeper()
    sweeper._clock_ms = clock
    assert sweeper.sweep() == []  # the lease is live: a live holder would serve it
    clock.now = lease + 1
    due = DynamoDueEnds(aws.dynamodb(config), config.connections_table).due_before(clock.now, 100)
    assert DueEnd("fanout-due", job.job_id, "conn-due", lease) in due
    assert job.job_id in sweeper.sweep()
    assert job.job_id not in sweeper.sweep()  # looked at again a lease later
    mark = marks.get("job", job.job_id, sort={"sequence_id": END_SEQUENCE_ID})
    assert mark is not None and mark["live"] is True and mark["redeliveries"] == 1

    Fanout(parts.jobs, parts.chunks, parts.store, parts.pusher, clock_ms=clock).deliver(
        job.job_id, ended=ended
    )
    assert_complete_at_least_once(parts.pusher.messages["conn-due"], 0, 3)
    assert parts.store.for_job(job.job_id) == []
    clock.now += 10 * LEASE_MS
    assert job.job_id not in sweeper.sweep()


def test_only_a_held_subscription_or_one_the_end_woke_is_due(stack: StackDescription) -> None:
    parts = Parts(Tenant("fanout-due"))
    job = parts.new_job()
    store, now = parts.store, now_ms()
    store.put(Subscription(job.job_id, "conn-free", 0))  # nobody holds it: not due
    (free,) = store.for_job(job.job_id)
    assert free.end_due_ms is None
    store.put(Subscription(job.job_id, "conn-held", 0, sender="h", sending_until_ms=now + 1_000))
    assert store.get(job.job_id, "conn-held").end_due_ms == now + 1_000  # type: ignore[union-attr]
    assert store.release(job.job_id, "conn-held", "h", wakes=0).applied  # let go: no longer due
    assert store.get(job.job_id, "conn-held").end_due_ms is None  # type: ignore[union-attr]
    # the end wakes a holder: due by its lease as it stands in that write
    assert store.claim(job.job_id, "conn-held", "h", prev=0, new=0, until_ms=now + 5_000).applied
    assert store.wake(job.job_id, "conn-held", "h", now_ms=now).applied  # a chunk's wake: not due
    assert store.get(job.job_id, "conn-held").end_due_ms is None  # type: ignore[union-attr]
    assert store.wake(job.job_id, "conn-held", "h", now_ms=now, end=True).applied
    assert store.get(job.job_id, "conn-held").end_due_ms == now + 5_000  # type: ignore[union-attr]
    store.abandon(job.job_id, "conn-held", "h", pushed=0)
    assert store.get(job.job_id, "conn-held").end_due_ms is None  # type: ignore[union-attr]
