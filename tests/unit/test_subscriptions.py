"""WebSocket subscriptions: order, no gap, no duplicate and exactly one ``done`` while the chunk stream
delivers in order and subscribe handlers run at any moment; at least once, never a gap, when a sender
dies; what a delivery costs; the stream records the fanout pushes from."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

import pytest

from spool_core.adapters.dynamodb import serialize
from spool_core.due_ends import DueEndSweeper
from spool_core.events import done_data
from spool_core.fanout_batch import DeliveryFailed, FanoutBatch, Group
from spool_core.jobs.model import END_SEQUENCE_ID, Chunk, EndMark, Job
from spool_core.subscriptions import LEASE_MS, STREAM, Fanout, Subscription
from spool_core.units import now_ms
from tests.subscription_fakes import MemoryDueEnds, MemoryJobLog, MemorySubscriptionStore, RecordingPusher

JOB = "job_1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


class Killed(BaseException):
    """The invocation dies where it stands (a timeout, an out-of-memory kill): no cleanup runs."""


def fanout(
    log: MemoryJobLog, store: MemorySubscriptionStore, pusher: RecordingPusher, clock: Any = None
) -> Fanout:
    """An invocation of the subscribe handler or the fanout (a handler is its own lease owner)."""
    return Fanout(log, log, store, pusher, **({"clock_ms": clock} if clock else {}))  # type: ignore[arg-type]


def end_of(job: Job) -> EndMark:
    return EndMark.of(job)


def chunk_ids(messages: list[dict[str, Any]]) -> list[int]:
    return [m["sequence_id"] for m in messages if m["type"] == "chunk"]


def assert_complete(messages: list[dict[str, Any]], after: int, last: int) -> None:
    """Every chunk after ``after`` up to ``last``, in order, once each, then exactly one ``done``."""
    assert chunk_ids(messages) == list(range(after + 1, last + 1))
    assert [m["type"] for m in messages].count("done") == 1
    assert messages[-1]["type"] == "done"


def assert_complete_at_least_once(messages: list[dict[str, Any]], after: int, last: int) -> None:
    """What a client that drops a ``sequence_id`` it already holds sees: every chunk after ``after`` up
    to ``last``, in order, then ``done`` (after a sender died, a message may come twice, never missing)."""
    kept, seen = [], after
    for message in messages:
        if message["type"] == "chunk":
            assert kept[-1:] != ["done"], "a chunk after done"
            if message["sequence_id"] > seen:
                assert message["sequence_id"] == seen + 1, f"a gap before {message['sequence_id']}"
                seen = message["sequence_id"]
                kept.append(seen)
        else:
            kept.append("done")
    assert kept[-1] == "done" and [k for k in kept if k != "done"] == list(range(after + 1, last + 1))


@pytest.fixture
def parts() -> tuple[MemoryJobLog, MemorySubscriptionStore, RecordingPusher]:
    log = MemoryJobLog()
    log.create(JOB)
    return log, MemorySubscriptionStore(), RecordingPusher()


# ---------------------------------------------------------------------------------------- races
def race(seed: int, *, kills: bool, handler_kills: bool = False) -> None:
    """The worker writes a job's chunks; it marks them live from the flush after a client subscribed;
    the chunk stream delivers each live chunk's record, then the job's end mark (written with the end
    when the job was subscribed by then), in order, one delivery at a time, as Lambda reads a shard;
    subscribe handlers run at random moments (before, during and after the job), concurrently with the
    stream. Random pauses before every store call and push shuffle the interleavings. With ``kills``, a
    stream delivery may die between its claim and its push, and Lambda runs it again. With
    ``handler_kills``, a subscribe handler may die at any push (holding its lease; nothing runs to let
    go): once the leases have run out, the sweeper has the end of each job it stranded delivered again."""
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def pause() -> None:
        with rng_lock:
            delay = rng.choice((0, 0, 0, 0.0001, 0.0004))
        time.sleep(delay)

    log, store = MemoryJobLog(pause), MemorySubscriptionStore(pause)
    log.create(JOB)
    total = rng.randint(2, 9)
    joins = {f"c{n}": (rng.randint(0, total + 1), rng.randint(0, 2)) for n in range(3)}
    pushes, killed = [0], set()

    class MayDie(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            with rng_lock:
                pushes[0] += 1
                name = threading.current_thread().name
                die = ((kills and name == "stream") or (handler_kills and name.startswith("handler"))) and (
                    rng.random() < 0.15
                )
            if die:
                killed.add(pushes[0])
                raise Killed
            return super().send(connection_id, message)

    pusher = MayDie(pause)
    handlers: list[threading.Thread] = []

    def subscribe(connection: str, after: int) -> None:
        with contextlib.suppress(Killed):  # the invocation died: its client gets nothing more from it
            fanout(log, store, pusher).subscribe(JOB, connection, after)

    def join(connection: str, after: int) -> None:
        thread = threading.Thread(target=subscribe, args=(connection, after), name=f"handler-{connection}")
        handlers.append(thread)
        thread.start()

    def stream(clock: Any = None, **delivery: Any) -> None:
        for _ in range(20):  # Lambda retries a batch whose invocation died
            try:
                fanout(log, store, pusher, clock).deliver(JOB, **delivery)
                return
            except Killed:
                continue
        raise AssertionError("the delivery kept dying")

    threading.current_thread().name = "stream"
    try:
        live, invoked = False, 0  # what the worker saw at its last flush; deliveries of chunk records
        for connection, (at, after) in joins.items():
            if at == 0:  # before the job wrote anything
                join(connection, after)
        for seq in range(1, total + 1):
            for connection, (at, after) in joins.items():
                if at == seq:
                    join(connection, after)
            chunk = log.append(JOB, f"<{seq}>")
            if live:
                invoked += 1
                stream(chunks=[chunk])
            live = live or log.get(JOB).subscribed  # type: ignore[union-attr]  # the worker's check
        ended = log.end(JOB)
        if ended.subscribed:  # the end mark, written with the end
            stream(ended=end_of(ended))
        for connection, (at, after) in joins.items():
            if at > total:
                join(connection, after)
    finally:
        threading.current_thread().name = "MainThread"
    for thread in handlers:
        thread.join(timeout=60)
        assert not thread.is_alive()
    if handler_kills:  # a lease later: the sweeper, and the chunk stream's delivery of each touched mark
        later = Clock()
        later.now = now_ms() + LEASE_MS + 1
        for job_id in DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=later).sweep():
            threading.current_thread().name = "stream"
            try:
                stream(later, ended=end_of(log.jobs[job_id]))
            finally:
                threading.current_thread().name = "MainThread"

    for connection, (_, after) in joins.items():
        messages = pusher.messages[connection]
        if kills or handler_kills:
            assert_complete_at_least_once(messages, after, total)
        else:
            assert_complete(messages, after, total)
        assert messages[-1] == {"type": "done", **done_data(ended)}
    assert store.items == {}
    assert invoked < total  # the chunks before the first subscribe invoked nothing


@pytest.mark.parametrize("seed", range(200))
def test_the_stream_in_order_and_handlers_at_any_moment_deliver_everything_once(seed: int) -> None:
    race(seed, kills=False)


@pytest.mark.parametrize("seed", range(100))
def test_a_stream_delivery_that_dies_is_run_again_and_nothing_is_missing(seed: int) -> None:
    race(seed, kills=True)


@pytest.mark.parametrize("seed", range(100))
def test_a_handler_that_dies_at_any_push_strands_nothing_the_sweeper_cannot_redeliver(seed: int) -> None:
    race(seed, kills=False, handler_kills=True)


def test_a_job_that_ends_while_the_handler_sends_its_backlog_still_gets_done(parts: Any) -> None:
    """The end mark's delivery finds the handler's lease live (it is pushing the backlog): it wakes the
    handler, which cannot let go before it looked again, and sends the rest and ``done`` itself."""
    log, store, pusher = parts
    log.append(JOB, "a")
    ended_during_push: list[bool] = []

    class EndsDuringPush(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            if message.get("sequence_id") == 1 and not ended_during_push:
                ended_during_push.append(True)
                two = log.append(JOB, "b")
                fanout(log, store, pusher).deliver(JOB, chunks=[two])  # finds the lease held: wakes
                ended = log.end(JOB)
                fanout(log, store, pusher).deliver(JOB, ended=end_of(ended))  # likewise
                assert pusher.messages.get("c") == []
            return bool(pusher.send(connection_id, message))

    pusher.messages["c"] = []
    Fanout(log, log, store, EndsDuringPush()).subscribe(JOB, "c", 0)  # type: ignore[arg-type]
    assert_complete(pusher.messages["c"], 0, 2)
    assert store.calls["wake"] >= 1
    assert store.items == {}


@pytest.mark.parametrize("written_before_the_read", [0, 1, 2])
def test_a_job_that_ends_between_the_handlers_log_read_and_its_look_at_the_job_still_gets_done(
    parts: Any, written_before_the_read: int
) -> None:
    """The handler reads the log and the job at once. When the job writes its last chunks and ends
    between the two (the end mark's delivery finds the lease held and wakes the handler), the look
    sees the end while the log read missed the last chunks: the handler reads on and sends them and
    ``done`` itself, with nothing else to come from the stream."""
    log, store, pusher = parts
    for n in range(written_before_the_read):
        log.append(JOB, f"<{n + 1}>")
    log_read = threading.Event()
    reading, looking = log.after, log.get

    def after(job_id: str, after: int, limit: int, **kwargs: Any) -> list[Chunk]:
        found = reading(job_id, after, limit, **kwargs)
        log_read.set()
        return found

    def get(job_id: str) -> Job | None:
        if not log_read.is_set():  # the look waits for the log read, then the job ends
            assert log_read.wait(10)
            for n in range(written_before_the_read, 3):
                chunk = log.append(JOB, f"<{n + 1}>")
                fanout(log, store, pusher).deliver(JOB, chunks=[chunk])  # finds the lease held: wakes
            ended = log.end(JOB)
            fanout(log, store, pusher).deliver(JOB, ended=end_of(ended))  # likewise
        return looking(job_id)

    log.after, log.get = after, get
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    assert_complete(pusher.messages["c"], 0, 3)
    assert store.items == {}


def test_a_short_job_that_ended_as_it_was_subscribed_costs_one_log_read(parts: Any) -> None:
    """The usual subscribe to a short job: it is running when marked and has ended, every chunk
    written, by the look. The log read beside the look already holds the last chunk: not read again."""
    log, store, pusher = parts
    marking = log.mark_subscribed

    def mark_then_end(job_id: str) -> Job:
        job = marking(job_id)
        for n in range(3):
            log.append(JOB, f"<{n + 1}>")
        log.end(JOB)
        return job

    log.mark_subscribed = mark_then_end
    reads = log.reads["log"]
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    assert_complete(pusher.messages["c"], 0, 3)
    assert log.reads["log"] - reads == 1


def test_a_handler_that_died_holding_its_lease_is_taken_over_and_its_claim_sent_again(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    log.append(JOB, "a")
    # The handler stored the subscription, claimed chunk 1 and died before pushing it or letting go.
    store.put(Subscription(JOB, "c", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    assert store.claim(JOB, "c", "dead", prev=0, new=1, until_ms=clock.now + 45_000).applied
    two = log.append(JOB, "b")
    fanout(log, store, pusher, clock).deliver(JOB, chunks=[two])  # the lease is live: it wakes the dead one
    assert pusher.messages.get("c") is None
    clock.now += 45_001
    ended = log.end(JOB)
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(ended))
    assert_complete(pusher.messages["c"], 0, 2)  # chunk 1 pushed again: at least once, never a gap
    assert store.calls["take_over"] == 1
    assert store.items == {}


def test_a_stream_delivery_that_died_after_its_claim_pushes_its_run_again(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    batch = [log.append(JOB, text) for text in "ab"]
    # The delivery of chunks 1-2 claimed them and died before pushing: Lambda runs the batch again.
    assert store.claim(JOB, "c", STREAM, prev=0, new=2, until_ms=10**15, made_for=2).applied
    fanout(log, store, pusher).deliver(JOB, chunks=batch)
    assert chunk_ids(pusher.messages["c"]) == [1, 2]
    three = log.append(JOB, "c")
    fanout(log, store, pusher).deliver(JOB, chunks=[three])  # the next batch: only its own chunk
    ended = log.end(JOB)
    assert store.claim_done(JOB, "c", STREAM, last=3, until_ms=10**15, made_for=END_SEQUENCE_ID).applied
    fanout(log, store, pusher).deliver(JOB, ended=end_of(ended))  # the end's delivery died after its claim
    assert_complete(pusher.messages["c"], 0, 3)
    assert store.items == {}


def test_a_delivery_that_read_a_stale_cursor_never_sends_an_earlier_deliverys_chunks(parts: Any) -> None:
    """A chunk's delivery queries subscriptions eventually consistent: the cursor it starts from may be
    behind the chunk stream's last claim, made for earlier records; it moves on, sending nothing twice."""
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    one, two = log.append(JOB, "a"), log.append(JOB, "b")
    fanout(log, store, pusher).deliver(JOB, chunks=[one])
    stale = [Subscription(JOB, "c", 0)]
    original = store.for_job
    store.for_job = lambda job_id, consistent=True: stale if not consistent else original(job_id)  # type: ignore[method-assign]
    fanout(log, store, pusher).deliver(JOB, chunks=[two])
    store.for_job = original  # type: ignore[method-assign]
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete(pusher.messages["c"], 0, 2)


def test_a_subscription_whose_after_was_never_sent_is_taken_over_without_a_duplicate(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    chunks = [log.append(JOB, text) for text in "abc"]
    store.put(Subscription(JOB, "c", 2, start=2, sender="dead", sending_until_ms=clock.now))
    clock.now += 1
    fanout(log, store, pusher, clock).deliver(JOB, chunks=chunks[2:])
    assert chunk_ids(pusher.messages["c"]) == [3]  # chunk 2 was the client's own `after`


def test_a_handler_ahead_of_the_stream_is_not_woken_for_what_it_already_claimed(parts: Any) -> None:
    """The subscribe handler reads the log and claims chunks before their stream records arrive; a
    record it already claimed must not keep it looking again (it would hold the lease, and the
    subscribe invocation with it, for as long as the job runs)."""
    log, store, pusher = parts
    one = log.append(JOB, "a")
    store.put(Subscription(JOB, "c", 0, sender="handler", sending_until_ms=10**15))
    assert store.claim(JOB, "c", "handler", prev=0, new=1, until_ms=10**15).applied  # it is pushing 1
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
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert pusher.messages["c"][-1]["type"] == "done"


def test_a_subscribe_marks_the_job_once_and_an_ended_job_not_at_all(parts: Any) -> None:
    log, store, pusher = parts
    assert log.get(JOB).subscribed is False  # type: ignore[union-attr]
    reads = log.reads["job"]
    fanout(log, store, pusher).subscribe(JOB, "a", 0)
    assert log.reads["job"] - reads == 1  # the sender's look; the mark returned the job, unread
    assert log.get(JOB).subscribed is True  # type: ignore[union-attr]
    log.create("job_2")
    log.end("job_2")
    fanout(log, store, pusher).subscribe("job_2", "b", 0)
    assert log.get("job_2").subscribed is False  # type: ignore[union-attr]  # nothing more will be written
    assert_complete(pusher.messages["b"], 0, 0)


# ---------------------------------------------------------------------------------------- cost
def test_a_job_without_subscribers_costs_one_query_per_batch(parts: Any) -> None:
    log, store, pusher = parts
    chunks = [log.append(JOB, text) for text in "abc"]
    assert fanout(log, store, pusher).deliver(JOB, chunks=chunks) == 0
    assert fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB))) == 0
    assert store.calls == {"for_job": 2}
    assert log.reads == {}
    assert pusher.messages == {}


def test_a_stream_delivery_is_one_claim_pushed_from_its_records(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    store.calls.clear()
    log.reads.clear()
    one = log.append(JOB, "a")
    fanout(log, store, pusher).deliver(JOB, chunks=[one])
    batch = [log.append(JOB, text) for text in "bcd"]
    fanout(log, store, pusher).deliver(JOB, chunks=batch)
    assert store.calls == {"for_job": 2, "claim": 2}  # one write per delivery; nothing to let go
    assert log.reads == {}  # pushed from the records themselves
    ended = log.end(JOB)
    store.calls.clear()
    fanout(log, store, pusher).deliver(JOB, ended=end_of(ended))
    assert store.calls == {"for_job": 1, "claim_done": 1, "finish": 1}
    assert log.reads == {}  # the end mark follows every chunk in the stream: no read of the log
    assert_complete(pusher.messages["c"], 0, 4)
    # a chunk's delivery may miss a subscription made a moment ago (its backlog or the next delivery
    # brings it the chunk): half the cost; the end's delivery, which nobody else makes, never may
    assert store.consistent_queries == [False, False, True]


def test_a_gap_before_the_batch_is_filled_from_the_log_never_past_it(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    for text in "abc":
        log.append(JOB, text)  # written before the worker saw the subscription: no records
    four = log.append(JOB, "d")
    log.append(JOB, "e")  # written already, but its record comes in the next batch
    fanout(log, store, pusher).deliver(JOB, chunks=[four])
    assert chunk_ids(pusher.messages["c"]) == [1, 2, 3, 4]
    assert log.reads["log"] == 2  # the subscribe's backlog read, then the gap


def test_the_end_mark_brings_the_chunks_that_had_no_record(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    for text in "ab":
        log.append(JOB, text)  # the worker had not seen the subscription yet
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete(pusher.messages["c"], 0, 2)


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
        Fanout(log, log, store, FailsOnThird()).deliver(JOB, chunks=batch)  # type: ignore[arg-type]
    assert store.items[(JOB, "c")].last_sent == 2
    fanout(log, store, pusher).deliver(JOB, chunks=batch)  # the batch's retry
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete(pusher.messages["c"], 0, 4)


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
    ended = end_of(log.end(JOB))
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
    assert fanout(log, store, pusher).subscribe("job_unknown", "c", 0) is False
    assert store.items == {}


class Throttled(Exception):
    """A write refused for another reason than its condition (throughput, a timeout)."""


@pytest.mark.parametrize("failing", ["mark_subscribed", "put"])
def test_a_subscribe_whose_mark_or_subscription_fails_leaves_no_subscription(
    parts: Any, failing: str
) -> None:
    """The mark and the subscription are written at once; when either fails, the handler fails (the
    client subscribes again) and leaves nothing that would later send to it under a dead lease."""
    log, store, pusher = parts
    log.append(JOB, "<1>")
    target = log if failing == "mark_subscribed" else store
    write = getattr(target, failing)

    def reply_lost(*args: Any) -> Any:  # applied, but the handler hears an error
        write(*args)
        raise Throttled("the write's reply was lost")

    setattr(target, failing, reply_lost)
    with pytest.raises(Throttled):
        fanout(log, store, pusher).subscribe(JOB, "c", 0)
    assert store.items == {} and "c" not in pusher.messages


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
    assert done == {"type": "done", **done_data(ended)} == {"type": "done", **done_data(end_of(ended))}


# ---------------------------------------------------------------------------------------- records
def record(pk: str, image: dict[str, Any] | None, *, sequence_id: int, seq: str = "1") -> dict[str, Any]:
    keys: dict[str, Any] = {"pk": {"S": pk}, "sequence_id": {"N": str(sequence_id)}}
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
        "live": {"BOOL": True},
    }
    return record(f"{tenant}#job#{job}", image, sequence_id=n, seq=f"{job}-{n}")


def end_record(tenant: str, job: str, status: str) -> dict[str, Any]:
    log = MemoryJobLog()
    log.create(job)
    mark = end_of(log.end(job, status)).model_dump()
    image = serialize({**mark, "live": True})
    return record(f"{tenant}#job#{job}", image, sequence_id=END_SEQUENCE_ID, seq=f"{job}-end")


def test_a_batch_is_grouped_by_job_with_its_chunks_in_order_and_its_end() -> None:
    batch = FanoutBatch(
        [
            chunk_record("t1", "job_a", 1),
            chunk_record("t1", "job_b", 7),
            chunk_record("t1", "job_a", 2),
            end_record("t2", "job_c", "cancelled"),
            record("t1#job#job_a", None, sequence_id=1),  # a TTL removal
            {"dynamodb": {"Keys": {"pk": {"S": "t1#job#job_d"}}, "NewImage": {"status": {"S": "x"}}}},
            "not a record",
        ]
    )
    groups = batch.groups
    assert set(groups) == {("t1", "job_a"), ("t1", "job_b"), ("t2", "job_c")}
    assert [c.sequence_id for c in groups[("t1", "job_a")].chunks] == [1, 2]
    assert groups[("t1", "job_a")].chunks[1].text == "<2>"
    ended = groups[("t2", "job_c")].ended
    assert ended is not None and ended.status == "cancelled" and ended.last_sequence_id == 0


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
    batch.handle(record("t#ctx#x", {"x": {"S": "y"}}, sequence_id=1), deliver)
    assert delivered == ["job_a", "job_b"]


def test_the_jobs_of_a_batch_are_delivered_at_once_and_each_record_reports_its_own() -> None:
    """Two jobs of one batch are delivered at the same time: each delivery waits for the other to
    have started (one after another, the first would wait for ever: the barrier breaks after 30 s).
    A failed job fails each of its records, and only those."""
    records = [
        chunk_record("t", "job_a", 1),
        chunk_record("t", "job_b", 1),
        chunk_record("t", "job_c", 1),
        chunk_record("t", "job_a", 2),
    ]
    batch = FanoutBatch(records)
    both_started = threading.Barrier(2, timeout=30)
    delivered: list[str] = []

    def deliver(tenant: str, job: str, group: Group) -> None:
        if job in ("job_a", "job_b"):
            both_started.wait()
        delivered.append(job)
        if job == "job_c":
            raise RuntimeError("throttled")

    batch.deliver_all(deliver, at_once=2)
    assert sorted(delivered) == ["job_a", "job_b", "job_c"]
    assert batch.groups[("t", "job_a")].error is None and batch.groups[("t", "job_b")].error is None
    for each in (records[0], records[1], records[3]):
        batch.handle(each, deliver)  # delivered: nothing more
    with pytest.raises(DeliveryFailed):
        batch.handle(records[2], deliver)
    assert sorted(delivered) == ["job_a", "job_b", "job_c"]


def test_a_delivery_that_kills_the_process_is_not_taken_for_a_failed_record() -> None:
    """What is not an Exception (a SystemExit in a delivery thread) ends the invocation, as it does
    one delivering alone: Lambda then retries the whole batch."""
    records = [chunk_record("t", "job_a", 1), chunk_record("t", "job_b", 1)]

    def deliver(tenant: str, job: str, group: Group) -> None:
        if job == "job_b":
            raise SystemExit(1)

    with pytest.raises(SystemExit):
        FanoutBatch(records).deliver_all(deliver)


def test_records_that_cannot_be_read_are_delivered_from_the_log_and_the_job(parts: Any) -> None:
    bad = record("t#job#job_a", {"text": {"S": "no created_at"}}, sequence_id=3)
    bad_end = record("t#job#job_a", {"status": {"S": "nonsense"}}, sequence_id=END_SEQUENCE_ID)
    batch = FanoutBatch([chunk_record("t", "job_a", 2), bad, bad_end])
    seen: list[Group] = []
    batch.handle(bad, lambda tenant, job, group: seen.append(group))
    assert [c.sequence_id for c in seen[0].chunks] == [2]
    assert seen[0].until == 3 and seen[0].end_unread and seen[0].ended is None
    # deliver() then reads chunk 3 from the log, and how the job ended from the job
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    chunks = [log.append(JOB, text) for text in "abc"]
    log.end(JOB)
    fanout(log, store, pusher).deliver(JOB, chunks=chunks[1:2], until=3, end_unread=True)
    assert_complete(pusher.messages["c"], 0, 3)


def test_chunks_in_a_batch_are_pushed_as_written(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    chunk = Chunk(sequence_id=1, text="from the record", created_at="t", tokens=1, tokens_total=1)
    fanout(log, store, pusher).deliver(JOB, chunks=[chunk])
    assert pusher.messages["c"] == [
        {"type": "chunk", "job_id": JOB, "sequence_id": 1, "text": "from the record"}
    ]


def test_an_id_no_job_could_have_is_not_found_without_a_write(parts: Any) -> None:
    log, store, pusher = parts
    marked: list[str] = []
    marking = log.mark_subscribed
    log.mark_subscribed = lambda job_id: marked.append(job_id) or marking(job_id)
    assert fanout(log, store, pusher).subscribe("j" * 65, "c", 0) is False
    assert (marked, store.items, pusher.messages) == ([], {}, {})
    assert fanout(log, store, pusher).subscribe(JOB, "c", 0) is True  # a job's own id still subscribes
    assert marked == [JOB]
