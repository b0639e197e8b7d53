"""Recovery after a sender dies or fails mid-push: a take-over records the taker's claim (so a retry of
the taker pushes it again), and a re-push that fails does not mark what it never pushed as sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from spool_core.adapters.websocket import DynamoDueEnds
from spool_core.due_ends import DueEndSweeper
from spool_core.subscriptions import STREAM, Fanout, Subscription
from tests.subscription_fakes import MemoryDueEnds, MemoryJobLog, MemorySubscriptionStore, RecordingPusher
from tests.unit.test_subscriptions import JOB, Clock, Killed, assert_complete_at_least_once, end_of, fanout


@pytest.fixture
def parts() -> tuple[MemoryJobLog, MemorySubscriptionStore, RecordingPusher]:
    log = MemoryJobLog()
    log.create(JOB)
    return log, MemorySubscriptionStore(), RecordingPusher()


class BreaksOnce(RecordingPusher):
    """Passes pushes to ``target``; the ``at``-th push raises ``breaking()``."""

    breaking: Callable[[], BaseException]

    def __init__(self, target: RecordingPusher, at: int) -> None:
        super().__init__()
        self.target, self.at, self.count = target, at, 0

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        self.count += 1
        if self.count == self.at:
            raise self.breaking()
        return self.target.send(connection_id, message)


class DiesOnce(BreaksOnce):
    """The ``at``-th push kills the invocation (no cleanup runs)."""

    breaking = Killed


class FailsOnce(BreaksOnce):
    """The ``at``-th push fails (the management API)."""

    @staticmethod
    def breaking() -> BaseException:
        return ConnectionError("the management API failed")


def test_a_stream_delivery_that_took_over_and_died_mid_push_again_leaves_no_gap(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    for t in "abc":
        log.append(JOB, t)
    # A handler claimed 1..3 and died before pushing them or letting go.
    store.put(Subscription(JOB, "c", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    assert store.claim(JOB, "c", "dead", prev=0, new=3, until_ms=clock.now + 45_000).applied
    clock.now += 45_001
    four = log.append(JOB, "d")
    # Chunk 4's delivery takes over, pushes chunk 1 again and dies: Lambda runs the batch again.
    dying = Fanout(log, log, store, DiesOnce(pusher, at=2), clock_ms=clock)
    with pytest.raises(Killed):
        dying.deliver(JOB, chunks=[four])
    fanout(log, store, pusher, clock).deliver(JOB, chunks=[four])
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete_at_least_once(pusher.messages["c"], 0, 4)


def test_a_stream_delivery_that_took_over_a_done_claim_and_died_still_sends_done(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    log.append(JOB, "a")
    ended = log.end(JOB)
    # A handler pushed chunk 1, claimed done and died before pushing it.
    store.put(Subscription(JOB, "c", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    assert store.claim(JOB, "c", "dead", prev=0, new=1, until_ms=clock.now + 45_000).applied
    pusher.send("c", {"type": "chunk", "job_id": JOB, "sequence_id": 1, "text": "a"})
    assert store.claim_done(JOB, "c", "dead", last=1, until_ms=clock.now + 45_000).applied
    clock.now += 45_001
    with pytest.raises(Killed):  # the end's delivery takes over and dies pushing done
        Fanout(log, log, store, DiesOnce(pusher, at=1), clock_ms=clock).deliver(JOB, ended=end_of(ended))
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(ended))
    assert_complete_at_least_once(pusher.messages["c"], 0, 1)


def test_a_retry_whose_push_again_fails_does_not_mark_the_unpushed_claim_as_sent(parts: Any) -> None:
    log, store, pusher = parts
    fanout(log, store, pusher).subscribe(JOB, "c", 0)
    batch = [log.append(JOB, t) for t in "abc"]
    # The delivery of 1..3 claimed them and died; its retry fails pushing chunk 1 again.
    assert store.claim(JOB, "c", STREAM, prev=0, new=3, until_ms=10**15, made_for=3).applied
    with pytest.raises(ConnectionError):
        Fanout(log, log, store, FailsOnce(pusher, at=1)).deliver(JOB, chunks=batch)
    fanout(log, store, pusher).deliver(JOB, chunks=batch)
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete_at_least_once(pusher.messages["c"], 0, 3)


def test_a_take_over_whose_push_again_fails_does_not_mark_the_dead_claim_as_sent(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    for t in "abc":
        log.append(JOB, t)
    store.put(Subscription(JOB, "c", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    assert store.claim(JOB, "c", "dead", prev=0, new=3, until_ms=clock.now + 45_000).applied
    clock.now += 45_001
    four = log.append(JOB, "d")
    with pytest.raises(ConnectionError):
        Fanout(log, log, store, FailsOnce(pusher, at=1), clock_ms=clock).deliver(JOB, chunks=[four])
    fanout(log, store, pusher, clock).deliver(JOB, chunks=[four])
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(log.end(JOB)))
    assert_complete_at_least_once(pusher.messages["c"], 0, 4)


# ------------------------------------------------------------------ a handler that stops early hands back
def sent(messages: list[dict[str, Any]]) -> list[int | str]:
    return [m["sequence_id"] if m["type"] == "chunk" else m["type"] for m in messages]


class SlowPushes(RecordingPusher):
    """Each push to ``target`` takes a second of ``clock``'s time (a long backlog, a slow API)."""

    def __init__(self, target: RecordingPusher, clock: Clock) -> None:
        super().__init__()
        self.target, self.clock = target, clock

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        self.clock.now += 1_000
        return self.target.send(connection_id, message)


def test_a_handler_out_of_time_leaves_an_ended_jobs_backlog_to_the_chunk_stream(parts: Any) -> None:
    """The subscribe handler would time out before its backlog went out (and, dead holding its lease,
    leave it to nobody: no stream record follows a job's end). It stops before its deadline, lets go
    at what it pushed and touches the end mark; the stream's delivery of it sends the rest and done."""
    log, store, pusher = parts
    clock = Clock()
    for text in "abcde":
        log.append(JOB, text)
    ended = log.end(JOB)
    handler = Fanout(log, log, store, SlowPushes(pusher, clock), clock_ms=clock, ends=log)
    assert handler.subscribe(JOB, "c", 0, deadline_ms=clock.now + 2_500)  # answered, not failed
    assert sent(pusher.messages["c"]) == [1, 2, 3]
    assert log.redelivered == [JOB]
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(ended))  # the touched mark's record
    assert sent(pusher.messages["c"]) == [1, 2, 3, 4, 5, "done"]  # each once


def test_a_handler_out_of_time_on_a_running_job_leaves_the_rest_to_its_next_chunk(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    for text in "abcde":
        log.append(JOB, text)
    handler = Fanout(log, log, store, SlowPushes(pusher, clock), clock_ms=clock, ends=log)
    assert handler.subscribe(JOB, "c", 0, deadline_ms=clock.now + 2_500)
    assert log.redelivered == []  # running: its next chunk's record comes anyway
    six = log.append(JOB, "f")
    fanout(log, store, pusher, clock).deliver(JOB, chunks=[six])
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(log.end(JOB)))
    assert sent(pusher.messages["c"]) == [1, 2, 3, 4, 5, 6, "done"]


def test_a_handler_whose_push_failed_after_the_end_woke_it_hands_the_end_back(parts: Any) -> None:
    """The end's stream delivery found the handler's lease and woke it; then the handler's push failed
    (the management API): it lets go with its wake unserved, so it touches the end mark, and the
    stream's delivery of it sends what the handler could not, and done."""
    log, store, pusher = parts
    log.append(JOB, "a")

    class EndsThenFails(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))  # finds the lease: wakes
            raise ConnectionError("the management API failed")

    with pytest.raises(ConnectionError):
        Fanout(log, log, store, EndsThenFails(), ends=log).subscribe(JOB, "c", 0)
    assert pusher.messages.get("c") is None and log.redelivered == [JOB]
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.jobs[JOB]))  # the touched mark's record
    assert sent(pusher.messages["c"]) == [1, "done"]


def test_a_handler_that_fails_on_a_running_job_touches_nothing(parts: Any) -> None:
    log, store, pusher = parts
    log.append(JOB, "a")
    with pytest.raises(ConnectionError):
        Fanout(log, log, store, FailsOnce(pusher, at=1), ends=log).subscribe(JOB, "c", 0)
    assert log.redelivered == []
    two = log.append(JOB, "b")
    fanout(log, store, pusher).deliver(JOB, chunks=[two])  # the next chunk's delivery goes on
    fanout(log, store, pusher).deliver(JOB, ended=end_of(log.end(JOB)))
    assert sent(pusher.messages["c"]) == [1, 2, "done"]


# ------------------------------------------------------------------ an end that woke a dead handler
def test_a_handler_killed_holding_its_lease_as_the_job_ends_gets_its_end_redelivered(parts: Any) -> None:
    """The subscribe handler dies outright (nothing runs to let go) with its backlog claimed; the job's
    end finds its lease live and only wakes it, and no record follows the end. The wake marks the end
    due; once the dead holder's lease runs out, the sweeper touches the end mark, and the end's
    delivery takes the lease over and sends the rest and done."""
    log, store, pusher = parts
    clock = Clock()
    due = MemoryDueEnds(store)
    sweeper = DueEndSweeper(due, lambda tenant: log, clock_ms=clock)
    for text in "abc":
        log.append(JOB, text)
    with pytest.raises(Killed):
        Fanout(log, log, store, DiesOnce(pusher, at=2), clock_ms=clock, ends=log).subscribe(JOB, "c", 0)
    ended = end_of(log.end(JOB))
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)  # the end's record: wakes the dead holder
    assert sent(pusher.messages["c"]) == [1]
    assert sweeper.sweep() == [] and log.redelivered == []  # due only once the holder's lease is out
    clock.now += 45_001
    assert sweeper.sweep() == [JOB] and log.redelivered == [JOB]
    assert sweeper.sweep() == []  # looked at again a lease later, not on every sweep
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)  # the touched mark's record
    assert_complete_at_least_once(pusher.messages["c"], 0, 3)
    assert sent(pusher.messages["c"]).count("done") == 1
    clock.now += 10 * 45_001
    assert sweeper.sweep() == [] and store.items == {}  # done: nothing left due


def test_a_live_handler_woken_by_the_end_sends_done_itself_and_leaves_nothing_due(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    log.append(JOB, "a")

    class EndArrivesMidPush(RecordingPusher):
        def send(self, connection_id: str, message: dict[str, Any]) -> bool:
            if not log.jobs[JOB].terminal:  # the end's delivery finds the lease: wakes the handler
                fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(log.end(JOB)))
            return pusher.send(connection_id, message)

    assert Fanout(log, log, store, EndArrivesMidPush(), clock_ms=clock, ends=log).subscribe(JOB, "c", 0)
    assert sent(pusher.messages["c"]) == [1, "done"]
    clock.now += 10 * 45_001
    assert DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock).sweep() == []
    assert log.redelivered == []


def test_a_due_end_is_left_to_a_live_holder_until_its_lease_ends(parts: Any) -> None:
    log, store, _ = parts
    clock = Clock()
    sweeper = DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock)
    log.append(JOB, "a")
    log.end(JOB)
    store.put(Subscription(JOB, "c", 0, sender="holder", sending_until_ms=clock.now + 45_000))
    assert store.items[(JOB, "c")].end_due_ms == clock.now + 45_000  # due by the lease it holds
    assert store.claim(JOB, "c", "holder", prev=0, new=1, until_ms=clock.now + 90_000).applied
    assert store.wake(JOB, "c", "holder", now_ms=clock.now, end=True).applied
    assert store.items[(JOB, "c")].end_due_ms == clock.now + 90_000  # the lease as it stood
    assert not store.wake(JOB, "c", "other", now_ms=clock.now, end=True).applied
    store.items[(JOB, "c")].end_due_ms = clock.now - 1  # due; the holder's lease is live
    assert sweeper.sweep() == [] and log.redelivered == []
    assert store.items[(JOB, "c")].end_due_ms == clock.now + 90_000  # looked at when the lease ends
    clock.now += 90_001
    assert sweeper.sweep() == [JOB]
    store.items[(JOB, "c")].end_due_ms = None
    assert store.wake(JOB, "c", "holder", now_ms=0).applied  # a chunk's wake marks nothing
    assert store.items[(JOB, "c")].end_due_ms is None


def test_live_holders_due_first_do_not_starve_a_stranded_subscription_behind_them(parts: Any) -> None:
    log, store, _ = parts
    clock = Clock()
    for n in range(3):  # due first, their holders alive (renewing their leases)
        store.put(Subscription(JOB, f"live{n}", 0, sender=f"h{n}", sending_until_ms=clock.now + 1))
    log.create("job_2")
    log.append("job_2", "a")
    log.end("job_2")
    clock.now += 10
    store.put(Subscription("job_2", "dead", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    sweeper = DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock, batch=3)
    for _ in range(3):  # a sweep a minute
        clock.now += 60_000
        for n in range(3):
            store.items[(JOB, f"live{n}")].sending_until_ms = clock.now + 45_000
        sweeper.sweep()
    assert log.redelivered == ["job_2"]


def test_a_handler_killed_before_its_mark_on_the_job_applied_gets_the_job_at_its_end(parts: Any) -> None:
    """The subscription is stored beside the job's mark; the handler dies after the store and before
    the mark (nothing runs to delete it): the job's chunks are never marked live, nor is its end mark,
    so no record would ever reach the subscriber. The sweeper keeps looking while the job runs, and
    once it has ended has its end delivered: every chunk and done."""
    log, store, pusher = parts
    clock = Clock()
    sweeper = DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock)
    log.append(JOB, "a")
    store.put(Subscription(JOB, "c", 0, sender="dead", sending_until_ms=clock.now + 45_000))
    clock.now += 45_001
    assert sweeper.sweep() == []  # running
    log.append(JOB, "b")
    ended = log.end(JOB)
    assert not ended.subscribed  # its end mark is not live: the stream would deliver nothing
    clock.now += 60_000
    assert sweeper.sweep() == [JOB]
    fanout(log, store, pusher, clock).deliver(JOB, ended=end_of(ended))
    assert sent(pusher.messages["c"]) == [1, 2, "done"]


def test_a_due_subscription_under_an_invalid_tenant_id_is_skipped() -> None:
    class Client:
        """A DynamoDB client with one due item under a partition key no tenant could have."""

        class exceptions:  # noqa: N801 - boto3's name
            ConditionalCheckFailedException = KeyError

        def query(self, **call: Any) -> dict[str, Any]:
            if {"S": "due#0"} not in call["ExpressionAttributeValues"].values():  # one partition holds it
                return {"Items": []}
            return {
                "Items": [{"pk": {"S": "bad tenant!#job#j1"}, "sk": {"S": "sub#c"}, "end_due_ms": {"N": "1"}}]
            }

        def get_item(self, **call: Any) -> dict[str, Any]:
            return {"Item": {"sk": {"S": "sub#c"}, "sending_until_ms": {"N": "1"}}}

    due = DynamoDueEnds(Client(), "connections")  # type: ignore[arg-type]
    assert DueEndSweeper(due, lambda tenant: MemoryJobLog(), clock_ms=lambda: 10**13).sweep() == []


def test_a_handler_killed_sending_the_backlog_of_an_ended_job_gets_its_end_redelivered(parts: Any) -> None:
    """The job had ended before the subscribe (its end's record went by with nobody to send to); the
    handler dies outright mid-backlog. Its subscription was due from its creation: the sweeper has the
    end delivered again once the lease runs out."""
    log, store, pusher = parts
    clock = Clock()
    sweeper = DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock)
    for text in "abc":
        log.append(JOB, text)
    ended = end_of(log.end(JOB))
    with pytest.raises(Killed):
        Fanout(log, log, store, DiesOnce(pusher, at=3), clock_ms=clock, ends=log).subscribe(JOB, "c", 0)
    assert sent(pusher.messages["c"]) == [1, 2]
    assert sweeper.sweep() == []
    clock.now += 45_001
    assert sweeper.sweep() == [JOB]
    fanout(log, store, pusher, clock).deliver(JOB, ended=ended)
    assert sent(pusher.messages["c"]) == [1, 2, 1, 2, 3, "done"]  # its claim again (at least once)


def test_a_handler_that_lets_go_is_no_longer_due(parts: Any) -> None:
    log, store, pusher = parts
    clock = Clock()
    log.append(JOB, "a")
    assert fanout(log, store, pusher, clock).subscribe(JOB, "c", 0)  # running: pushes 1, lets go
    assert store.items[(JOB, "c")].end_due_ms is None
    clock.now += 10 * 45_001
    assert DueEndSweeper(MemoryDueEnds(store), lambda tenant: log, clock_ms=clock).sweep() == []
