"""In-memory stand-ins for the fanout's ports: subscriptions with the DynamoDB adapter's conditions
(each operation one atomic step under a lock, the item as it was returned whether the condition held
or not), a job store and chunk log, and a pusher that records what each connection received.

``pause`` is called before every operation and every push (outside the lock): tests use it to
shuffle how concurrent senders interleave."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from spool_core.due_ends import DueEnd
from spool_core.jobs.model import Chunk, Job, JobRequest, Progress, Usage
from spool_core.jobs.ports import Conflict
from spool_core.subscriptions import Subscription, Written

Pause = Callable[[], None]


def _nothing() -> None:
    return None


class MemorySubscriptionStore:
    def __init__(self, pause: Pause = _nothing) -> None:
        self.items: dict[tuple[str, str], Subscription] = {}
        self.calls: Counter[str] = Counter()
        self.consistent_queries: list[bool] = []  # each for_job's consistency
        self._lock = threading.Lock()
        self._pause = pause

    def _op(self, name: str) -> None:
        self._pause()
        self.calls[name] += 1

    def put(self, subscription: Subscription) -> None:
        self._op("put")
        with self._lock:
            self.items[(subscription.job_id, subscription.connection_id)] = replace(
                subscription,
                done_sent=False,
                wakes=0,
                served=0,
                claimed_from=0,
                claimed_by=None,
                claimed_for=0,
                end_due_ms=subscription.sending_until_ms if subscription.sender else None,
            )

    def for_job(self, job_id: str, *, consistent: bool = True) -> list[Subscription]:
        self._op("for_job")
        self.consistent_queries.append(consistent)
        with self._lock:
            return [replace(s) for (job, _), s in sorted(self.items.items()) if job == job_id]

    def get(self, job_id: str, connection_id: str) -> Subscription | None:
        self._op("get")
        with self._lock:
            found = self.items.get((job_id, connection_id))
            return replace(found) if found else None

    def _update(
        self,
        name: str,
        job_id: str,
        connection_id: str,
        condition: Callable[[Subscription], bool],
        change: Callable[[Subscription], None],
    ) -> Written:
        self._op(name)
        with self._lock:
            item = self.items.get((job_id, connection_id))
            if item is None:
                return Written(False, None)
            before = replace(item)
            if not condition(item):
                return Written(False, before)
            change(item)
            return Written(True, before)

    @staticmethod
    def _lease_free(item: Subscription, owner: str) -> bool:
        return item.sender is None or item.sender == owner

    def claim(
        self,
        job_id: str,
        connection_id: str,
        owner: str,
        *,
        prev: int,
        new: int,
        until_ms: int,
        made_for: int = 0,
    ) -> Written:
        def change(item: Subscription) -> None:
            item.last_sent, item.claimed_from = new, prev + 1
            item.claimed_by, item.claimed_for = owner, made_for
            item.sender, item.sending_until_ms = owner, until_ms

        return self._update(
            "claim",
            job_id,
            connection_id,
            lambda i: i.last_sent == prev and not i.done_sent and self._lease_free(i, owner),
            change,
        )

    def claim_done(
        self, job_id: str, connection_id: str, owner: str, *, last: int, until_ms: int, made_for: int = 0
    ) -> Written:
        def change(item: Subscription) -> None:
            item.done_sent, item.sender, item.sending_until_ms = True, owner, until_ms
            item.claimed_by, item.claimed_for = owner, made_for

        return self._update(
            "claim_done",
            job_id,
            connection_id,
            lambda i: i.last_sent == last and not i.done_sent and self._lease_free(i, owner),
            change,
        )

    def take_over(
        self,
        job_id: str,
        connection_id: str,
        owner: str,
        *,
        holder: str,
        now_ms: int,
        until_ms: int,
        made_for: int = 0,
    ) -> Written:
        def change(item: Subscription) -> None:
            item.sender, item.sending_until_ms = owner, until_ms
            item.claimed_by, item.claimed_for = owner, made_for  # the holder's last claim is the taker's

        return self._update(
            "take_over",
            job_id,
            connection_id,
            lambda i: i.sender == holder and i.sending_until_ms < now_ms,
            change,
        )

    def release(self, job_id: str, connection_id: str, owner: str, *, wakes: int) -> Written:
        def change(item: Subscription) -> None:
            item.sender, item.sending_until_ms, item.served, item.end_due_ms = None, 0, wakes, None

        return self._update(
            "release", job_id, connection_id, lambda i: i.sender == owner and i.wakes == wakes, change
        )

    def abandon(self, job_id: str, connection_id: str, owner: str, *, pushed: int) -> None:
        def change(item: Subscription) -> None:
            item.sender, item.sending_until_ms, item.done_sent, item.last_sent = None, 0, False, pushed
            item.claimed_by, item.claimed_for = None, 0  # what went out is behind the cursor: no claim left
            item.end_due_ms = None

        self._update("abandon", job_id, connection_id, lambda i: i.sender == owner, change)

    def wake(
        self, job_id: str, connection_id: str, holder: str, *, now_ms: int, end: bool = False
    ) -> Written:
        def change(item: Subscription) -> None:
            item.wakes += 1
            if end:
                item.end_due_ms = item.sending_until_ms

        return self._update(
            "wake",
            job_id,
            connection_id,
            lambda i: i.sender == holder and i.sending_until_ms >= now_ms,
            change,
        )

    def finish(self, job_id: str, connection_id: str, owner: str) -> None:
        self._op("finish")
        with self._lock:
            item = self.items.get((job_id, connection_id))
            if item is not None and item.sender == owner:
                del self.items[(job_id, connection_id)]

    def delete(self, job_id: str, connection_id: str) -> None:
        self._op("delete")
        with self._lock:
            self.items.pop((job_id, connection_id), None)


class MemoryDueEnds:
    """The due subscriptions of ``store`` (one tenant's), as the sweeper's index serves them."""

    def __init__(self, store: MemorySubscriptionStore, tenant_id: str = "t") -> None:
        self.store, self.tenant_id = store, tenant_id

    def due_before(self, now_ms: int, limit: int) -> list[DueEnd]:
        with self.store._lock:
            due = [
                DueEnd(self.tenant_id, job, connection, s.end_due_ms)
                for (job, connection), s in self.store.items.items()
                if s.end_due_ms is not None and s.end_due_ms < now_ms
            ]
        return sorted(due, key=lambda d: d.due_ms)[:limit]

    def lease_of(self, end: DueEnd) -> int | None:
        with self.store._lock:
            item = self.store.items.get((end.job_id, end.connection_id))
            return None if item is None else item.sending_until_ms

    def postpone(self, end: DueEnd, until_ms: int | None) -> None:
        with self.store._lock:
            item = self.store.items.get((end.job_id, end.connection_id))
            if item is not None:
                item.end_due_ms = until_ms


class MemoryJobLog:
    """Jobs and their chunk logs (``JobStore.get`` and ``ChunkLog`` reads), with read counts."""

    def __init__(self, pause: Pause = _nothing) -> None:
        self.jobs: dict[str, Job] = {}
        self.chunks: dict[str, dict[int, Chunk]] = {}
        self.reads: Counter[str] = Counter()
        self.redelivered: list[str] = []  # jobs whose end mark was touched for the stream (EndMarks)
        self._lock = threading.Lock()
        self._pause = pause

    def create(self, job_id: str) -> Job:
        job = Job(
            job_id=job_id,
            tenant_id="t",
            status="running",
            request=JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 10}),
            fingerprint="f",
            model_requested="sim-fast",
            model_resolved="sim-fast",
            created_at="2026-11-27T07:00:00Z",
            attempts=1,
        )
        with self._lock:
            self.jobs[job_id] = job
            self.chunks[job_id] = {}
        return job

    def append(self, job_id: str, text: str) -> Chunk:
        with self._lock:
            log = self.chunks[job_id]
            seq = len(log) + 1
            chunk = Chunk(sequence_id=seq, text=text, created_at="t", tokens=1, tokens_total=seq)
            log[seq] = chunk
            return chunk

    def end(self, job_id: str, status: str = "completed", error: dict[str, Any] | None = None) -> Job:
        with self._lock:
            last = len(self.chunks[job_id])
            job = self.jobs[job_id].model_copy(
                update={
                    "status": status,
                    "progress": Progress(tokens_generated=last, last_sequence_id=last, chunks_written=last),
                    "usage": Usage(estimated_tokens=10, input_tokens=3, output_tokens=last),
                    "cost_nanos": 1234 * last,
                    "error": error,
                }
            )
            self.jobs[job_id] = job
            return job

    def get(self, job_id: str) -> Job | None:
        self._pause()
        self.reads["job"] += 1
        with self._lock:
            return self.jobs.get(job_id)

    def mark_subscribed(self, job_id: str) -> Job:
        self._pause()
        with self._lock:
            if job_id not in self.jobs:
                raise Conflict(None)
            if self.jobs[job_id].terminal:
                return self.jobs[job_id]  # ended: nothing to mark
            job = self.jobs[job_id].model_copy(update={"subscribed": True})
            self.jobs[job_id] = job
            return job

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        self._pause()
        self.reads["log"] += 1
        with self._lock:
            log = self.chunks.get(job_id, {})
            return [log[seq] for seq in sorted(log) if seq > after][:limit]

    def last(self, job_id: str) -> Chunk | None:
        found = self.after(job_id, 0, 10**9)
        return found[-1] if found else None

    def redeliver_end(self, job_id: str) -> bool:
        """``EndMarks``: records the request (the tests play the chunk stream's delivery of it)."""
        with self._lock:
            ended = job_id in self.jobs and self.jobs[job_id].terminal
            if ended:
                self.redelivered.append(job_id)
            return ended

    def all(self, job_id: str) -> Iterator[Chunk]:
        return iter(self.after(job_id, 0, 10**9))


class RecordingPusher:
    """What each connection received, in order; ``gone`` connections refuse (GoneException)."""

    def __init__(self, pause: Pause = _nothing) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.gone: set[str] = set()
        self.failing: set[str] = set()  # raise (an error other than a gone connection)
        self._lock = threading.Lock()
        self._pause = pause

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        self._pause()
        if connection_id in self.failing:
            raise ConnectionError("the management API failed")
        if connection_id in self.gone:
            return False
        with self._lock:
            self.messages.setdefault(connection_id, []).append(message)
        return True
