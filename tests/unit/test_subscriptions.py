"""WebSocket subscriptions: order, no gap, no duplicate and exactly one ``done`` under concurrent
senders; what a delivery costs; the stream records the fanout pushes from."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from spool_core.events import done_data
from spool_core.fanout_batch import DeliveryFailed, FanoutBatch, Group
from spool_core.subscriptions import Fanout, Subscription
from tests.subscription_fakes import MemoryJobLog, MemorySubscriptionStore, RecordingPusher

JOB = "job_1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def fanout(
    log: MemoryJobLog, store: MemorySubscriptionStore, pusher: RecordingPusher, clock: Any = None
) -> Fanout:
    """A sender (an invocation: its own lease owner)."""
    return Fanout(log, log, store, pusher, **({"clock_ms": clock} if clock else {}))  # type: ignore[arg-type]


def chunk_ids(messages: list[dict[str, Any]]) -> list[int]:
    return [m["sequence_id"] for m in messages if m["type"] == "chunk"]


def assert_complete(messages: list[dict[str, Any]], after: int, last: int) -> None:
    """Every chunk after ``after`` up to ``last``, in order, once each, then exactly one ``done``."""
    assert chunk_ids(messages) == list(range(after + 1, last + 1))
    assert [m["type"] for m in messages].count("done") == 1
    assert messages[-1]["type"] == "done"


@pytest.fixture
def parts() -> tuple[MemoryJobLog, MemorySubscriptionStore, RecordingPusher]:
    log = MemoryJobLog()
    log.create(JOB)
    return log, MemorySubscriptionStore(), RecordingPusher()


# ---------------------------------------------------------------------------------------- races
@pytest.mark.parametrize("seed", range(200))
def test_concurrent_senders_and_an_end_between_two_chunks_deliver_everything_once(seed: int) -> None:
    """The worker writes chunks; each chunk's stream record is delivered by its own invocation
    (several at once); the job ends while some of them still run; subscribers join before and during
    the job (their backlog sent while live chunks arrive). Random pauses before every store call and
    push shuffle the interleavings. Each subscriber gets every chunk after its ``after`` in order, once,
    then exactly one ``done``; no subscription is left behind."""
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def pause() -> None:
        with rng_lock:
            delay = rng.choice((0, 0, 0, 0.0001, 0.0004))
        time.sleep(delay)

    log, store, pusher = MemoryJobLog(pause), MemorySubscriptionStore(pause), RecordingPusher(pause)
    log.create(JOB)
    total = rng.randint(3, 9)
    early = {f"early-{n}": rng.randint(0, 2) for n in range(2)}
    late_after = rng.randint(0, 2)
    for connection, after in early.items():
        fanout(log, store, pusher).subscribe(JOB, connection, after)

    threads: list[threading.Thread] = []

    def start(target: Any) -> None:
        thread = threading.Thread(target=target)
        threads.append(thread)
        thread.start()

    late_at = rng.randint(1, total)
    end_at = rng.randint(total - 1, total)  # the end's record races the last one or two chunks'
    for seq in range(1, total + 1):
        chunk = log.append(JOB, f"<{seq}>")
        start(lambda chunk=chunk: fanout(log, store, pusher).deliver(JOB, chunks=[chunk]))
        if seq == late_at:
            start(lambda: fanout(log, store, pusher).subscribe(JOB, "late", late_after))
        if seq == end_at and seq < total:
            start(lambda: fanout(log, store, pusher).deliver(JOB))  # a redelivery: catch up from the log
    ended = log.end(JOB)
    start(lambda: fanout(log, store, pusher).deliver(JOB, ended=ended))
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()

    for connection, after in {**early, "late": late_after}.items():
        messages = pusher.messages[connection]
        assert_complete(messages, after, total)
        assert messages[-1] == {"type": "done", **done_data(ended)}
    assert store.items == {}


@pytest.mark.parametrize("seed", range(100))
def test_only_live_chunks_invoke_the_fanout_and_subscribers_still_get_everything(seed: int) -> None:
    """As deployed: the chunk stream's filter passes only chunks the worker marked live, which it does
    from the flush after it saw the job's ``subscribed`` mark (set by the first subscribe). Chunks
    written before that reach the subscribers with the next live chunk or the job's end, whose record
    always invokes the fanout. Subscribers join at random points, while senders run concurrently."""
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def pause() -> None:
        with rng_lock:
            delay = rng.choice((0, 0, 0, 0.0001, 0.0004))
        time.sleep(delay)

    log, store, pusher = MemoryJobLog(pause), MemorySubscriptionStore(pause), RecordingPusher(pause)
    log.create(JOB)
    total = rng.randint(3, 9)
    joins = {f"c{n}": (rng.randint(1, total), rng.randint(0, 2)) for n in range(2)}
    threads: list[threading.Thread] = []

    def start(target: Any) -> None:
        thread = threading.Thread(target=target)
        threads.append(thread)
        thread.start()

    live, invoked = False, 0  # what the worker saw at its last flush; fanout invocations for chunks
    for seq in range(1, total + 1):
        chunk = log.append(JOB, f"<{seq}>")
        if live:
            invoked += 1
            start(lambda chunk=chunk: fanout(log, store, pusher).deliver(JOB, chunks=[chunk]))
        for connection, (at, after) in joins.items():
            if at == seq:
                start(lambda c=connection, a=after: fanout(log, store, pusher).subscribe(JOB, c, a))
        live = live or log.get(JOB).subscribed  # type: ignore[union-attr]  # the worker's check
    ended = log.end(JOB)
    start(lambda: fanout(log, store, pusher).deliver(JOB, ended=ended))
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()

    for connection, (_, after) in joins.items():
        assert_complete(pusher.messages[connection], after, total)
    assert store.items == {}
    assert invoked < total  # the chunks before the first subscribe invoked nothing


def test_a_subscribe_marks_the_job_once_and_an_ended_job_not_at_all(parts: Any) -> None:
    log, store, pusher = parts
    assert log.get(JOB).subscribed is False  # type: ignore[union-attr]
    fanout(log, store, pusher).subscribe(JOB, "a", 0)
    assert log.get(JOB).subscribed is True  # type: ignore[union-attr]
    log.create("job_2")
    log.end("job_2")
    fanout(log, store, pusher).subscribe("job_2", "b", 0)
    assert log.get("job_2").subscribed is False  # type: ignore[union-attr]  # nothing more will be written
    assert_complete(pusher.messages["b"], 0, 0)


def test_a_job_that_ends_while_another_sender_holds_the_cursor_still_gets_done(parts: Any) -> None:
    """The verified lost ``done``: the end's delivery finds the lease held (a chunk being pushed); it
    wakes the holder, which cannot let go before it looked again, and sends ``done`` itself."""
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    first = log.append(JOB, "a")
    ended_during_push: list[bool] = []

    class EndsDuringPush(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            if message.get("sequence_id") == 1 and not ended_during_push:
                ended_during_push.append(True)
                ended = log.end(JOB)  # the job ends while chunk 1 is being pushed
                fanout(log, store, pusher).deliver(JOB, ended=ended)  # finds the lease held
                assert "done" not in [m["type"] for m in pusher.messages.get("c", [])]
            return bool(pusher.send(connection_id, message))

    Fanout(log, log, store, EndsDuringPush()).deliver(JOB, chunks=[first])
    assert_complete(pusher.messages["c"], 0, 1)
    assert store.calls["wake"] == 1
    assert store.items == {}


def test_a_sender_whose_lease_ran_out_is_taken_over_and_its_last_message_sent_again(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    fanout(log, store, pusher, clock).subscribe(JOB, "c", 0)
    log.append(JOB, "a")
    # A sender claims chunk 1 and dies before pushing it or letting go.
    assert store.claim(JOB, "c", "dead", prev=0, new=1, until_ms=clock.now + 15_000).applied
    two = log.append(JOB, "b")
    fanout(log, store, pusher, clock).deliver(JOB, chunks=[two])  # the lease is live: it wakes the dead one
    assert pusher.messages.get("c") is None
    clock.now += 15_001
    ended = log.end(JOB)
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)
    assert_complete(pusher.messages["c"], 0, 2)  # chunk 1 pushed again: at least once, never a gap
    assert store.calls["take_over"] == 1
    assert store.items == {}


def test_a_sender_that_died_sending_done_is_taken_over_and_done_sent_again(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    fanout(log, store, pusher, clock).subscribe(JOB, "c", 0)
    ended = log.end(JOB)
    assert store.claim_done(JOB, "c", "dead", last=0, until_ms=clock.now + 15_000).applied
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)  # its holder is sending it
    assert pusher.messages.get("c") is None
    clock.now += 15_001
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)  # a retry of the end's record
    assert [m["type"] for m in pusher.messages["c"]] == ["done"]
    assert store.items == {}


def test_a_subscription_whose_after_was_never_sent_is_taken_over_without_a_duplicate(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    for text in "abc":
        log.append(JOB, text)
    store.put(Subscription(JOB, "c", 2, start=2))
    store.items[(JOB, "c")].sender, store.items[(JOB, "c")].sending_until_ms = "dead", clock.now
    clock.now += 1
    fanout(log, store, pusher, clock).deliver(JOB)
    assert chunk_ids(pusher.messages["c"]) == [3]  # chunk 2 was the client's own `after`


def test_a_holder_ahead_of_the_stream_is_not_woken_for_what_it_already_claimed(parts: Any) -> None:
    """The subscribe handler (or any holder) reads the log and claims chunks before their stream records
    arrive; a record it already claimed must not keep it busy looking again (it would hold the lease,
    and the subscribe invocation with it, for as long as the job runs)."""
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    one = log.append(JOB, "a")
    assert store.claim(JOB, "c", "holder", prev=0, new=1, until_ms=10**15).applied  # it is pushing 1
    fanout(log, store, pusher).deliver(JOB, chunks=[one])  # chunk 1's own record, late
    assert store.calls["wake"] == 0
    two = log.append(JOB, "b")
    fanout(log, store, pusher).deliver(JOB, chunks=[two])  # a chunk past its cursor: wake it
    assert store.calls["wake"] == 1


def test_resubscribing_starts_over_from_the_new_cursor(parts: Any) -> None:
    log, store, pusher = parts
    for text in "abc":
        log.append(JOB, text)
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    fanout(log, store, pusher).subscribe(JOB, "c", 1)
    assert chunk_ids(pusher.messages["c"]) == [1, 2, 3, 2, 3]  # what the client asked for, twice
    log.end(JOB)
    fanout(log, store, pusher).deliver(JOB)
    assert pusher.messages["c"][-1]["type"] == "done"


# ---------------------------------------------------------------------------------------- cost
def test_a_job_without_subscribers_costs_one_query_per_batch(parts: Any) -> None:
    log, store, pusher = parts
    chunks = [log.append(JOB, text) for text in "abc"]
    assert fanout(log, store, pusher).deliver(JOB, chunks=chunks) == 0
    assert fanout(log, store, pusher).deliver(JOB, ended=log.end(JOB)) == 0
    assert store.calls == {"for_job": 2}
    assert log.reads == {}
    assert pusher.messages == {}


def test_a_batch_is_one_claim_and_one_release_without_reads(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    store.calls.clear()
    log.reads.clear()
    one = log.append(JOB, "a")
    fanout(log, store, pusher).deliver(JOB, chunks=[one])
    batch = [log.append(JOB, text) for text in "bcd"]
    fanout(log, store, pusher).deliver(JOB, chunks=batch)
    assert store.calls == {"for_job": 2, "claim": 2, "release": 2}  # a run of chunks is one claim
    assert log.reads == {}  # pushed from the records themselves
    ended = log.end(JOB)
    store.calls.clear()
    fanout(log, store, pusher).deliver(JOB, ended=ended)
    assert store.calls == {"for_job": 1, "claim_done": 1, "finish": 1}
    assert log.reads == {"log": 1}  # the log is read once after the end, for any chunk not yet sent
    assert_complete(pusher.messages["c"], 0, 4)
    # a chunk's delivery may miss a subscription made a moment ago (its backlog or the next delivery
    # brings it the chunk): half the cost; the end's delivery, which nobody else makes, never may
    assert store.consistent_queries == [False, False, True]


def test_a_gap_before_the_batch_is_filled_from_the_log(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    for text in "abc":
        log.append(JOB, text)  # their records were lost (or their delivery failed)
    four = log.append(JOB, "d")
    fanout(log, store, pusher).deliver(JOB, chunks=[four])
    assert chunk_ids(pusher.messages["c"]) == [1, 2, 3, 4]
    assert log.reads["log"] == 2  # the subscribe's backlog read, then the gap


def test_a_long_backlog_is_read_and_claimed_in_pages(parts: Any) -> None:
    log, store, pusher = parts
    for n in range(250):
        log.append(JOB, str(n))
    log.end(JOB)
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    assert_complete(pusher.messages["c"], 0, 250)
    assert store.calls["claim"] == 3  # one write per page of 100


def test_a_push_failing_mid_run_resumes_after_the_last_message_that_went_out(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    batch = [log.append(JOB, text) for text in "abcd"]

    class FailsOnThird(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            if message.get("sequence_id") == 3:
                raise ConnectionError("the management API failed")
            return bool(pusher.send(connection_id, message))

    with pytest.raises(ConnectionError):
        Fanout(log, log, store, FailsOnThird()).deliver(JOB, chunks=batch)
    assert store.items[(JOB, "c")].last_sent == 2
    fanout(log, store, pusher).deliver(JOB, chunks=batch)  # the batch's retry
    fanout(log, store, pusher).deliver(JOB, ended=log.end(JOB))
    assert_complete(pusher.messages["c"], 0, 4)


def test_a_dead_senders_whole_run_is_pushed_again(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    fanout(log, store, pusher, clock).subscribe(JOB, "c", 1)
    for text in "abcd":
        log.append(JOB, text)
    assert store.claim(JOB, "c", "dead", prev=1, new=3, until_ms=clock.now).applied  # claimed 2..3, died
    clock.now += 1
    fanout(log, store, pusher, clock).deliver(JOB, ended=log.end(JOB))
    assert_complete(pusher.messages["c"], 1, 4)


def test_a_chunk_already_sent_costs_nothing_more(parts: Any) -> None:
    log, store, pusher = parts
    one = log.append(JOB, "a")
    fanout(log, store, pusher).subscribe(JOB, "c", 0)  # the backlog sent it
    store.calls.clear()
    fanout(log, store, pusher).deliver(JOB, chunks=[one])  # its record arrives afterwards
    assert store.calls == {"for_job": 1}
    assert chunk_ids(pusher.messages["c"]) == [1]


# ---------------------------------------------------------------------------------------- failures
def test_a_gone_connection_loses_its_subscription(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    pusher.gone.add("c")
    fanout(log, store, pusher).deliver(JOB, chunks=[log.append(JOB, "a")])
    assert store.items == {}


def test_a_failed_push_lets_go_at_once_and_the_retry_sends_it(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    one = log.append(JOB, "a")
    pusher.failing.add("c")
    with pytest.raises(ConnectionError):
        fanout(log, store, pusher).deliver(JOB, chunks=[one])
    assert store.items[(JOB, "c")].sender is None  # abandoned: no lease to wait out
    pusher.failing.clear()
    ended = log.end(JOB)
    pusher.failing.add("c")
    with pytest.raises(ConnectionError):
        fanout(log, store, pusher).deliver(JOB, ended=ended)
    assert store.items[(JOB, "c")].done_sent is False  # the failed done is unclaimed
    pusher.failing.clear()
    fanout(log, store, pusher).deliver(JOB, ended=ended)
    # The failed push let go with the cursor back before chunk 1: the end's delivery sends it first.
    assert_complete(pusher.messages["c"], 0, 1)
    assert store.items == {}


def test_subscribing_to_an_unknown_job_stores_nothing(parts: Any) -> None:
    log, store, pusher = parts
    assert fanout(log, store, pusher).subscribe("job_unknown", "c", 0) is None
    assert store.items == {}


def test_a_finished_job_sends_the_backlog_then_done_with_what_sse_carries(parts: Any) -> None:
    log, store, pusher = parts
    for text in "ab":
        log.append(JOB, text)
    ended = log.end(JOB, "failed", {"code": "provider_error", "message": "upstream failed"})
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    done = pusher.messages["c"][-1]
    assert done == {
        "type": "done",
        "job_id": JOB,
        "status": "failed",
        "usage": {"estimated_tokens": 10, "input_tokens": 3, "output_tokens": 2},
        "cost_usd": 2.468e-06,
        "error": {"code": "provider_error", "message": "upstream failed"},
        "last_sequence_id": 2,
    }
    assert done == {"type": "done", **done_data(ended)}


# ---------------------------------------------------------------------------------------- records
def record(
    pk: str, image: dict[str, Any] | None, *, sequence_id: int | None = None, seq: str = "1"
) -> dict[str, Any]:
    keys: dict[str, Any] = {"pk": {"S": pk}}
    if sequence_id is not None:
        keys["sequence_id"] = {"N": str(sequence_id)}
    data: dict[str, Any] = {"Keys": keys, "SequenceNumber": seq}
    if image is not None:
        data["NewImage"] = {**keys, **image}
    return {"eventName": "INSERT" if image else "REMOVE", "dynamodb": data}


def chunk_record(tenant: str, job: str, n: int) -> dict[str, Any]:
    image = {
        "text": {"S": f"<{n}>"},
        "created_at": {"S": "t"},
        "tokens": {"N": "1"},
        "tokens_total": {"N": str(n)},
    }
    return record(f"{tenant}#job#{job}", image, sequence_id=n, seq=f"{job}-{n}")


def job_record(tenant: str, job: str, status: str) -> dict[str, Any]:
    log = MemoryJobLog()
    log.create(job)
    item = (
        log.end(job, status) if status in {"completed", "failed", "cancelled"} else log.jobs[job]
    ).model_dump()
    from spool_core.adapters.dynamodb import serialize

    return record(f"{tenant}#job#{job}", serialize(item), seq=f"{job}-end")


def test_a_batch_is_grouped_by_job_with_its_chunks_in_order_and_its_end() -> None:
    batch = FanoutBatch(
        [
            chunk_record("t1", "job_a", 1),
            chunk_record("t1", "job_b", 7),
            chunk_record("t1", "job_a", 2),
            job_record("t1", "job_c", "running"),  # not an end: nothing to push
            job_record("t2", "job_c", "cancelled"),
            record("t1#job#job_a", None, sequence_id=1),  # a TTL removal
            record("t1#ctx#x", {"x": {"S": "y"}}),  # another kind of item
            "not a record",
        ]
    )
    groups = batch.groups
    assert set(groups) == {("t1", "job_a"), ("t1", "job_b"), ("t2", "job_c")}
    assert [c.sequence_id for c in groups[("t1", "job_a")].chunks] == [1, 2]
    assert groups[("t1", "job_a")].chunks[1].text == "<2>"
    ended = groups[("t2", "job_c")].ended
    assert ended is not None and ended.status == "cancelled"


def test_each_job_is_delivered_once_per_batch_and_a_failure_fails_all_its_records() -> None:
    records = [chunk_record("t", "job_a", 1), chunk_record("t", "job_b", 1), chunk_record("t", "job_a", 2)]
    batch = FanoutBatch(records)
    delivered: list[str] = []

    def deliver(tenant: str, job: str, group: Group) -> None:
        delivered.append(job)
        if job == "job_a":
            raise RuntimeError("throttled")

    with pytest.raises(RuntimeError):
        batch.handle(records[0], deliver)
    batch.handle(records[1], deliver)
    with pytest.raises(DeliveryFailed):
        batch.handle(records[2], deliver)
    batch.handle(record("t#ctx#x", {"x": {"S": "y"}}), deliver)
    assert delivered == ["job_a", "job_b"]


def test_a_record_that_cannot_be_read_is_delivered_from_the_log() -> None:
    bad = record("t#job#job_a", {"text": {"S": "no sequence"}}, sequence_id=3)
    bad["dynamodb"]["NewImage"].pop("sequence_id")
    batch = FanoutBatch([chunk_record("t", "job_a", 2), bad])
    seen: list[Group] = []
    batch.handle(bad, lambda tenant, job, group: seen.append(group))
    assert seen[0].chunks == [] and seen[0].ended is None  # deliver() catches up from the log
