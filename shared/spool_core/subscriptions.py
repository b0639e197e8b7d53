"""WebSocket subscriptions: every chunk after ``after``, in order, then ``done``; no gap, no duplicate.

A subscription item holds the last sequence id sent to its connection (``last_sent``) and a sending
lease (``sender``, ``sending_until``). Senders (the subscribe handler with the backlog, the fanout
with the chunks and the job's end of a stream batch) never read before writing in the common case:

- **One conditional write per message.** A sender claims chunk ``n`` with
  ``SET last_sent = n WHERE last_sent = n - 1`` (and the lease free or its own), then pushes it. The
  condition orders the messages and makes each one sent once; holding the lease while it pushes
  keeps a second sender from overtaking with ``n + 1`` before ``n`` is out. A condition that fails
  returns the item as it is (``ALL_OLD``), so the loser knows at once whether the message was sent
  already, whether there is a gap to fill from the chunk log, or who holds the lease.
- **Letting go.** The holder releases the lease with one more conditional write at the end of its
  burst. A sender that finds the lease held does not wait: it bumps the item's ``wakes`` counter
  (only while that holder's lease is live), and the holder's release is conditional on the counter
  it last served, so a holder that was woken cannot let go before it looked at the log and the job
  again. A holder that fails lets go without serving (``wakes`` then stays ahead of ``served``), and
  whoever takes the lease next looks first.
- **Runs.** Consecutive chunks a sender holds (a stream batch, a page of the backlog) are claimed
  in one write and pushed in order under the lease. A push that fails lets go with the cursor back
  at the last message pushed, so the retry sends the rest.
- **A sender that died holding the lease** (``LEASE_MS`` after its last claim) is taken over: the
  new holder pushes the dead one's last claim again (it may not have gone out: at least once, then,
  rather than a gap; a client drops a ``sequence_id`` it already holds) and serves what it was asked.
- **``done`` exactly once.** When the job has ended and the cursor is at the end of the log (read
  after the end was known, so it holds every chunk), ``SET done_sent = true`` under the same lease
  conditions claims the end; the sender pushes ``done`` and deletes the subscription. A job that
  ends while another sender holds the cursor wakes that sender, which then sends the rest and
  ``done`` itself: the end is never dropped between two chunks.
- **Nothing for jobs nobody follows.** ``deliver`` starts with one Query of the job's subscriptions
  (by partition key); with none, that Query is all a stream batch costs for the job.

A connection authenticated once, with an API key that may since have been revoked: the fanout passes
a ``ConnectionAccess`` (``spool_core.auth.ConnectionGuard``) to ``deliver``, and a connection it no
longer allows is closed and its subscription dropped instead of being sent anything more.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spool_core.events import done_data
from spool_core.jobs.model import Chunk, Job
from spool_core.jobs.ports import ChunkLog, JobStore
from spool_core.units import now_ms

# A sender that died holding the lease is taken over after this. Each claim renews it, so it covers
# one push: the management API client's worst case (3 attempts of a 3 s connect and a 10 s read).
LEASE_MS = 45_000
LOG_PAGE = 100


@dataclass
class Subscription:
    job_id: str
    connection_id: str
    last_sent: int
    done_sent: bool = False
    sender: str | None = None  # who holds the sending lease, if anyone
    sending_until_ms: int = 0
    wakes: int = 0  # bumped by senders that found the lease held: the holder looks again before letting go
    served: int = 0  # the wakes the last holder to let go had looked after
    start: int = 0  # the ``after`` it was created with: nothing at or before it is ever pushed
    claimed_from: int = 0  # the first message of the last claim (a run: the backlog, a stream batch)

    def held_by_other(self, owner: str, now_ms: int) -> bool:
        return self.sender is not None and self.sender != owner and self.sending_until_ms >= now_ms


@dataclass(frozen=True)
class Written:
    """The outcome of a conditional write: whether it applied, and the subscription as it was just
    before (``None`` when there is no such subscription)."""

    applied: bool
    before: Subscription | None


class SubscriptionStore(Protocol):
    def put(self, subscription: Subscription) -> None:
        """Create or replace (a resubscription starts over from its ``after``)."""

    def for_job(self, job_id: str, *, consistent: bool = True) -> list[Subscription]:
        """Every subscription to the job (one Query). ``consistent=False`` (half the cost) may miss a
        subscription made a moment ago: fine for new chunks, which its own backlog or the next
        delivery brings it; never for a job's end, whose ``done`` nobody else would send."""

    def get(self, job_id: str, connection_id: str) -> Subscription | None: ...

    def claim(
        self, job_id: str, connection_id: str, owner: str, *, prev: int, new: int, until_ms: int
    ) -> Written:
        """``last_sent = new`` (``claimed_from = prev + 1``) and the lease to ``owner`` until
        ``until_ms``, if ``last_sent == prev``, ``done`` was not sent, and the lease is free or
        already the owner's."""

    def claim_done(self, job_id: str, connection_id: str, owner: str, *, last: int, until_ms: int) -> Written:
        """``done_sent = true`` and the lease to ``owner``, under the same conditions with the cursor at
        ``last``."""

    def take_over(
        self, job_id: str, connection_id: str, owner: str, *, holder: str, now_ms: int, until_ms: int
    ) -> Written:
        """The lease to ``owner`` if ``holder``'s ran out (cursor and ``done_sent`` as they are)."""

    def release(self, job_id: str, connection_id: str, owner: str, *, wakes: int) -> Written:
        """Let go of the owner's lease, unless it was woken since ``wakes`` (then ``served = wakes``)."""

    def abandon(self, job_id: str, connection_id: str, owner: str, *, pushed: int) -> None:
        """Let go after an error: the cursor back to the last message pushed, ``done`` unclaimed, wakes
        left unserved for the next holder to serve."""

    def wake(self, job_id: str, connection_id: str, holder: str, *, now_ms: int) -> Written:
        """Ask ``holder`` to look again before it lets go (only while its lease is live)."""

    def finish(self, job_id: str, connection_id: str, owner: str) -> None:
        """Delete the subscription after its ``done`` (unless replaced by a new subscription meanwhile)."""

    def delete(self, job_id: str, connection_id: str) -> None: ...


class Pusher(Protocol):
    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        """Post a message to a connection; False when the connection is gone."""


class ConnectionAccess(Protocol):
    def allowed(self, connection_id: str) -> bool:
        """Whether the connection may still receive (its API key is still active)."""

    def close(self, connection_id: str) -> None:
        """Tell the connection why, then close it."""


def chunk_message(job_id: str, chunk: Chunk) -> dict[str, Any]:
    return {"type": "chunk", "job_id": job_id, "sequence_id": chunk.sequence_id, "text": chunk.text}


def done_message(job: Job) -> dict[str, Any]:
    """The WebSocket ``done``: what the SSE ``done`` event carries (one builder for both)."""
    return {"type": "done", **done_data(job)}


@dataclass
class _Known:
    """What one delivery knows of a job: chunks by sequence id (from the stream or the log) and, once
    known, how it ended. Shared by the job's subscribers within one delivery."""

    chunks: MutableMapping[int, Chunk] = field(default_factory=dict)
    ended: Job | None = None


class Fanout:
    def __init__(
        self,
        jobs: JobStore,
        chunks: ChunkLog,
        subscriptions: SubscriptionStore,
        pusher: Pusher,
        *,
        clock_ms: Callable[[], int] = now_ms,
        lease_ms: int = LEASE_MS,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._subscriptions = subscriptions
        self._pusher = pusher
        self._clock_ms = clock_ms
        self._lease_ms = lease_ms
        self._owner = uuid.uuid4().hex  # one per sender: each invocation builds its own Fanout

    def subscribe(self, job_id: str, connection_id: str, after: int) -> Job | None:
        """Record the subscription, mark the job subscribed (its worker then marks its chunks ``live``,
        the only ones the fanout is invoked for), then send the backlog (and ``done`` if the job has
        ended). The job is read again after the subscription is stored: a job that ends in between,
        whose end the fanout handled before it could see this subscription, is seen ending here. A
        chunk written before the worker saw the mark reaches the subscriber with the next live chunk
        or the job's end (each delivery reads the log from the subscriber's cursor)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        subscription = Subscription(job_id, connection_id, after, start=after)
        self._subscriptions.put(subscription)
        if not job.terminal and not job.subscribed:
            job = self._jobs.mark_subscribed(job_id)
        known = _Known(ended=job if job.terminal else None)
        _Sender(self, subscription, known, look=True).run()
        return job

    def deliver(
        self,
        job_id: str,
        *,
        chunks: Iterable[Chunk] = (),
        ended: Job | None = None,
        access: ConnectionAccess | None = None,
    ) -> int:
        """Send the job's subscribers what they have not had yet: ``chunks`` (a stream batch's new
        chunks; the log fills any gap before them), then ``done`` if ``ended`` (the job's terminal
        record). With neither, each subscriber is caught up from the log and the job as stored.

        With ``access``, a subscriber whose connection is no longer allowed is closed and its
        subscription deleted instead. Returns the number of subscriptions served."""
        batch = {chunk.sequence_id: chunk for chunk in chunks}
        look = not batch and ended is None
        subscriptions = self._subscriptions.for_job(job_id, consistent=not batch or ended is not None)
        if not subscriptions:
            return 0
        for subscription in subscriptions:
            if access is not None and not access.allowed(subscription.connection_id):
                access.close(subscription.connection_id)
                self._subscriptions.delete(job_id, subscription.connection_id)
                continue
            known = _Known(dict(batch), ended)
            _Sender(self, subscription, known, look=look).run()
        return len(subscriptions)


class _Sender:
    """One sender's pass over one subscription: claim, push, repeat; then ``done``, or let go."""

    def __init__(self, fanout: Fanout, subscription: Subscription, known: _Known, *, look: bool) -> None:
        self._f = fanout
        self._store = fanout._subscriptions
        self._owner = fanout._owner
        self._job_id = subscription.job_id
        self._connection = subscription.connection_id
        self._cursor = subscription.last_sent
        self._known = known
        self._look = look  # read the job and the log before concluding there is nothing to send
        self._holding = False
        self._served_wakes = 0  # the wakes counter as of this holder's last look
        self._pushed = subscription.last_sent  # the last message this sender knows went out
        self._read_at: int | None = None  # the cursor after which the log was last read
        self._log_more = False  # that read filled its page: more may follow
        self._read_since_end = False  # the log was read after the job's end was known

    def run(self) -> None:
        try:
            while self._step():
                pass
        except Exception:
            if self._holding:  # let the retry (or the next sender) go on at once, from what went out
                with contextlib.suppress(Exception):
                    self._store.abandon(self._job_id, self._connection, self._owner, pushed=self._pushed)
            raise

    def _step(self) -> bool:
        """One message (a chunk, or ``done``), or letting go. False when this pass is over."""
        chunk = self._next_chunk()
        if chunk is not None:
            return self._send(chunk)
        if self._known.ended is not None and self._read_since_end and not self._log_more:
            return self._send_done()
        return self._let_go()

    # ------------------------------------------------------------------ what to send next
    def _next_chunk(self) -> Chunk | None:
        chunk = self._known.chunks.get(self._cursor + 1)
        if chunk is None and self._should_read():
            self._read()
            chunk = self._known.chunks.get(self._cursor + 1)
        return chunk

    def _should_read(self) -> bool:
        ended = self._known.ended
        if self._look or (ended is not None and not self._read_since_end):
            return True
        if self._read_at == self._cursor:
            return False  # read from here already and found nothing more
        return (
            self._log_more
            or any(seq > self._cursor for seq in self._known.chunks)  # a gap before what the batch has
            or (ended is not None and self._cursor < ended.progress.last_sequence_id)
        )

    def _read(self) -> None:
        """The job first, then the log: every chunk of a job that has ended was written before its end."""
        if self._look and self._known.ended is None:
            job = self._f._jobs.get(self._job_id)
            if job is not None and job.terminal:
                self._known.ended = job
        page = self._f._chunks.after(self._job_id, self._cursor, LOG_PAGE)
        self._known.chunks.update((c.sequence_id, c) for c in page)
        self._read_at, self._log_more, self._look = self._cursor, len(page) == LOG_PAGE, False
        if self._known.ended is not None:
            self._read_since_end = True

    # ------------------------------------------------------------------ writes
    def _send(self, first: Chunk) -> bool:
        """Claim the run of consecutive chunks from ``first`` this sender holds, then push them."""
        run = [first]
        while len(run) < LOG_PAGE and (following := self._known.chunks.get(run[-1].sequence_id + 1)):
            run.append(following)
        now = self._f._clock_ms()
        written = self._store.claim(
            self._job_id,
            self._connection,
            self._owner,
            prev=self._cursor,
            new=run[-1].sequence_id,
            until_ms=now + self._f._lease_ms,
        )
        if not written.applied:
            return self._lost(written.before, now)
        self._acquired(written.before)
        self._cursor = run[-1].sequence_id
        return self._push(run)

    def _push(self, chunks: list[Chunk]) -> bool:
        for chunk in chunks:
            if not self._f._pusher.send(self._connection, chunk_message(self._job_id, chunk)):
                self._holding = False
                self._store.delete(self._job_id, self._connection)  # the connection is gone
                return False
            self._pushed = chunk.sequence_id
        return True

    def _send_done(self) -> bool:
        ended = self._known.ended
        assert ended is not None
        now = self._f._clock_ms()
        written = self._store.claim_done(
            self._job_id,
            self._connection,
            self._owner,
            last=self._cursor,
            until_ms=now + self._f._lease_ms,
        )
        if not written.applied:
            return self._lost(written.before, now)  # go on from the cursor it found, if at all
        self._holding = True
        self._push_done(ended)
        return False

    def _push_done(self, ended: Job) -> None:
        self._f._pusher.send(self._connection, done_message(ended))  # a gone connection: deleted below
        self._holding = False
        self._store.finish(self._job_id, self._connection, self._owner)

    def _let_go(self) -> bool:
        """Nothing more to send now: release the lease. True when woken meanwhile (look again)."""
        if not self._holding:
            return False
        written = self._store.release(self._job_id, self._connection, self._owner, wakes=self._served_wakes)
        current = written.before
        self._holding = False
        if written.applied or current is None or current.sender != self._owner:
            return False  # released; or gone; or taken over after the lease ran out
        self._holding, self._served_wakes, self._look = True, current.wakes, True
        return True

    def _acquired(self, before: Subscription | None) -> None:
        if self._holding or before is None:
            return
        self._holding, self._served_wakes = True, before.wakes
        if before.wakes != before.served:
            self._look = True  # a holder failed: serve what it was asked to

    def _wants_after(self, cursor: int) -> bool:
        """Whether this sender has something to deliver past ``cursor``: a chunk, the end, or a look
        (a holder racing ahead of the stream is not woken for chunks it already claimed)."""
        return self._look or self._known.ended is not None or any(seq > cursor for seq in self._known.chunks)

    def _take_over(self, current: Subscription, now: int) -> bool:
        """The holder's lease ran out (it died): take it, push its last claimed message again, go on."""
        assert current.sender is not None
        written = self._store.take_over(
            self._job_id,
            self._connection,
            self._owner,
            holder=current.sender,
            now_ms=now,
            until_ms=now + self._f._lease_ms,
        )
        before = written.before
        if not written.applied or before is None:
            return before is not None  # someone else took it, or it is gone
        self._holding, self._served_wakes, self._look = True, before.wakes, True
        self._cursor, self._read_at = before.last_sent, None
        if before.done_sent:
            ended = self._known.ended or self._f._jobs.get(self._job_id)
            if ended is not None and ended.terminal:
                self._push_done(ended)
                return False
            return True
        first = max(before.claimed_from, before.start + 1)
        if first > before.last_sent:
            return True
        known = [self._known.chunks.get(seq) for seq in range(first, before.last_sent + 1)]
        again = [chunk for chunk in known if chunk is not None]
        if len(again) < len(known):  # read what the batch does not have
            again = self._f._chunks.after(self._job_id, first - 1, before.last_sent - first + 1)
        return self._push(again)

    def _lost(self, current: Subscription | None, now: int) -> bool:
        """A claim's condition failed. True when this sender should go on (from the current cursor)."""
        self._holding = False
        if current is None:
            return False  # unsubscribed (or finished)
        if current.held_by_other(self._owner, now):
            assert current.sender is not None
            if current.done_sent or not self._wants_after(current.last_sent):
                return False  # its holder is sending ``done``, or claimed all this sender had
            woken = self._store.wake(self._job_id, self._connection, current.sender, now_ms=now)
            if woken.applied:
                return False  # the holder looks again before it lets go
            current = woken.before  # it let go meanwhile: go on from where it left the cursor
            if current is None or current.held_by_other(self._owner, now):
                return current is not None  # gone; or held by another already: try again
        if current.sender not in (None, self._owner):
            return self._take_over(current, now)  # its lease ran out
        if current.done_sent:
            return False
        self._holding = current.sender == self._owner
        if current.last_sent != self._cursor:
            self._cursor, self._read_at = current.last_sent, None
        return True
