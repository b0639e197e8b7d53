"""WebSocket subscriptions: every chunk after ``after``, in order, then ``done``; no gap, no duplicate.

A subscription item holds the last sequence id sent to its connection (``last_sent``), who claimed
the last run of messages (``claimed_by``, ``claimed_from``) and a sending lease (``sender``,
``sending_until``). Two kinds of sender push to it:

- **The subscribe handler**, once: it stores the subscription already holding its own lease, sends
  the backlog (and ``done`` if the job has ended), then lets go.
- **The chunk stream** (the fanout, from the records of live chunks and of the job's end mark). Lambda
  reads a stream shard one batch at a time, in order (the fanout's ``ParallelizationFactor`` is 1:
  above it, order is kept per item only, and each chunk is an item), and a job's chunks and its end
  mark share a partition key, hence a shard, so a job's stream deliveries never overlap and ``done``
  comes after every chunk.
  They all send as one owner, ``STREAM``: a delivery claims the run of chunks it holds with **one
  conditional write** (``SET last_sent = n WHERE last_sent = prev``), pushes it, and never lets go
  (the next delivery is the same owner). A delivery claims no further than its own records: what
  the chunk stream claimed past them can only be an earlier attempt of the same batch, which died
  after its claim, so it is pushed again (at least once, then, rather than a gap; a client drops a
  ``sequence_id`` it already holds).

Between the two, the lease: a stream delivery that finds the handler's lease live bumps the item's
``wakes`` counter instead of sending, and the handler's release is conditional on the counter it
last served, so a handler that was woken cannot let go before it looked at the log and the job
again. A handler that died holding its lease is taken over once it runs out (``LEASE_MS``): its last
claim becomes the taker's (a stream delivery that dies pushing it is retried and pushes it again) and
is pushed again: by the next chunk's delivery, or, when the job's end was what woke a holder that died
(no record follows the end), by the end's delivery once the sweeper touches the end mark again
(``spool_core.due_ends``).

``done`` is claimed (``SET done_sent``) under the same conditions once the cursor is at the job's last
chunk, pushed, and the subscription deleted. Nothing is pushed for jobs nobody follows: the worker
marks chunks ``live`` only once a client subscribed, and the chunk stream's filter passes nothing else.

A connection authenticated once, with an API key that may since have been revoked: the fanout passes
a ``ConnectionAccess`` (``spool_core.auth.ConnectionGuard``) to ``deliver``, and a connection it no
longer allows is closed and its subscription dropped instead of being sent anything more.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from spool_core.events import done_data
from spool_core.ids import plausible
from spool_core.jobs.model import END_SEQUENCE_ID, Chunk, EndMark, Job
from spool_core.jobs.ports import ChunkLog, Conflict, JobStore
from spool_core.units import now_ms

# A handler that died holding the lease is taken over after this. Each claim renews it, so it covers
# one push with room to spare: the management API client's worst case is 2 attempts of a 2 s connect
# and a 3 s read (spool_core.adapters.aws).
LEASE_MS = 45_000
LOG_PAGE = 100
STREAM = "stream"  # the owner every delivery from the chunk stream sends as


@dataclass
class Subscription:
    job_id: str
    connection_id: str
    last_sent: int
    done_sent: bool = False
    sender: str | None = None  # who holds the sending lease, if anyone
    sending_until_ms: int = 0
    wakes: int = 0  # bumped by stream deliveries that found the handler sending: it looks again
    served: int = 0  # the wakes the handler had looked after when it let go
    start: int = 0  # the ``after`` it was created with: nothing at or before it is ever pushed
    claimed_from: int = 0  # the first message of the last claim (a run: the backlog, a stream batch)
    claimed_by: str | None = None  # who made the last claim
    claimed_for: int = 0  # a stream delivery's last claim: the highest record it was made for
    key_hash: str | None = None  # the key the connection opened with: each delivery checks it is active
    end_due_ms: int | None = None  # while a handler holds it, or the end woke a holder (``due_ends``)

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
        """Create or replace (a resubscription starts over from its ``after``), with the lease it names
        (then due by that lease, ``end_due_ms``, until the holder lets go: ``release``, ``abandon``)."""

    def for_job(self, job_id: str, *, consistent: bool = True) -> list[Subscription]:
        """Every subscription to the job (one Query). ``consistent=False`` (half the cost) may miss a
        subscription made a moment ago: fine for new chunks, which its own backlog or the next
        delivery brings it; never for a job's end, whose ``done`` nobody else would send."""

    def get(self, job_id: str, connection_id: str) -> Subscription | None: ...

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
        """``last_sent = new`` (``claimed_from = prev + 1``, ``claimed_by = owner``, ``claimed_for =
        made_for``) and the lease to ``owner`` until ``until_ms``, if ``last_sent == prev``, ``done``
        was not sent, and the lease is free or already the owner's."""

    def claim_done(
        self, job_id: str, connection_id: str, owner: str, *, last: int, until_ms: int, made_for: int = 0
    ) -> Written:
        """``done_sent = true`` (``claimed_by``, ``claimed_for`` as a claim's) and the lease to
        ``owner``, under the same conditions with the cursor at ``last``."""

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
        """The lease to ``owner`` if ``holder``'s ran out (cursor, ``claimed_from`` and ``done_sent`` as
        they are), and the holder's last claim made the taker's (``claimed_by = owner``, ``claimed_for =
        made_for``): the taker pushes it again, and a retry of the taker, if it dies, pushes it again."""

    def release(self, job_id: str, connection_id: str, owner: str, *, wakes: int) -> Written:
        """Let go of the owner's lease, unless it was woken since ``wakes`` (then ``served = wakes``)."""

    def abandon(self, job_id: str, connection_id: str, owner: str, *, pushed: int) -> None:
        """Let go after an error: the cursor back to the last message pushed, ``done`` unclaimed, no
        claim left outstanding, wakes left unserved for the next holder to serve."""

    def wake(
        self, job_id: str, connection_id: str, holder: str, *, now_ms: int, end: bool = False
    ) -> Written:
        """Ask ``holder`` to look again before it lets go (only while its lease is live). ``end``: the
        wake is the job's end, which no later record brings again: the subscription is also marked due
        (``end_due_ms``, the holder's lease as it stands) for the sweeper, which redelivers the end if
        the holder dies without serving it (``spool_core.due_ends``)."""

    def finish(self, job_id: str, connection_id: str, owner: str) -> None:
        """Delete the subscription after its ``done`` (unless replaced by a new subscription meanwhile)."""

    def delete(self, job_id: str, connection_id: str) -> None: ...


class EndMarks(Protocol):
    def redeliver_end(self, job_id: str) -> bool:
        """Touch the job's end mark (and make it live) so the chunk stream delivers the job's end to
        its subscribers once more; False when the job has no end mark (it has not ended)."""


class HandedOver(Exception):  # not an error: the handler's time is up, the stream goes on
    """The handler stops before its invocation's deadline, leaving the rest to the chunk stream."""


class Pusher(Protocol):
    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        """Post a message to a connection; False when the connection is gone."""


class ConnectionAccess(Protocol):
    def allowed(self, connection_id: str, key_hash: str | None = None) -> bool:
        """Whether the connection may still receive (its API key, ``key_hash`` when the subscription
        recorded it, is still active)."""

    def close(
        self, connection_id: str, request_id: str | None, *, job_id: str | None = None, last_sent: int = 0
    ) -> None:
        """Tell the connection why (naming ``request_id``, the request whose check found it, and the
        job it was being sent with the last chunk sent of it), then close it."""


def chunk_message(job_id: str, chunk: Chunk) -> dict[str, Any]:
    return {"type": "chunk", "job_id": job_id, "sequence_id": chunk.sequence_id, "text": chunk.text}


def done_message(ended: EndMark) -> dict[str, Any]:
    """The WebSocket ``done``: what the SSE ``done`` event carries (one builder for both)."""
    return {"type": "done", **done_data(ended)}


@dataclass
class _Known:
    """What one delivery knows of a job: chunks by sequence id (from the stream or the log) and, once
    known, how it ended. Shared by the job's subscribers within one delivery."""

    chunks: MutableMapping[int, Chunk] = field(default_factory=dict)
    ended: EndMark | None = None


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
        ends: EndMarks | None = None,
    ) -> None:
        self._jobs = jobs
        self._chunks = chunks
        self._subscriptions = subscriptions
        self._pusher = pusher
        self._clock_ms = clock_ms
        self._lease_ms = lease_ms
        self._ends = ends  # where a handler that stops early hands an ended job's delivery back
        self._owner = uuid.uuid4().hex  # one per handler: each invocation builds its own Fanout

    def subscribe(
        self,
        job_id: str,
        connection_id: str,
        after: int,
        *,
        key_hash: str | None = None,
        deadline_ms: int | None = None,
    ) -> bool:
        """Mark the job subscribed (its worker then marks its chunks ``live``, the only ones the chunk
        stream delivers, and its end writes an end mark behind its last chunk) and record the
        subscription (holding the lease: no stream delivery pushes before the backlog), both at once;
        then send the backlog, and ``done`` if the job has ended.

        The mark returns the job (one request instead of a read and a write). Nothing is read before
        both writes are done: a live chunk the stream delivers before the subscription exists is in the
        backlog; a job that ended before the mark has no end mark, and is seen ending here (the mark
        returns it); one that ends after the mark but before the subscription exists is seen by the
        sender's look. A chunk written before the worker saw the mark reaches the subscriber with the
        next live chunk or the job's end mark (each delivery reads the log from the subscriber's cursor).
        False: there is no such job (the subscription, stored beside the mark under the tenant's own key
        where no other tenant's job can reach it, is deleted, as it is when either write fails).
        ``key_hash``: the key the connection opened with, recorded on the subscription so each delivery
        checks it without a read. An id no job could have is not found without a write (as a job read
        answers it, ``spool_core.ids.plausible``).

        ``deadline_ms``: when the handler must have stopped (its invocation's timeout, less a margin).
        A backlog too long to push by then is left to the chunk stream (``_hand_back``), as is what a
        failed push leaves: no stream record follows a job's end, so the handler touches the end mark
        for the stream to deliver it again."""
        if not plausible(job_id):
            return False
        subscription = Subscription(
            job_id,
            connection_id,
            after,
            start=after,
            sender=self._owner,
            sending_until_ms=self._clock_ms() + self._lease_ms,
            key_hash=key_hash,
        )
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="subscribe-put") as beside:
                stored = beside.submit(self._subscriptions.put, subscription)
                try:
                    job: Job | None = self._jobs.mark_subscribed(job_id)
                except Conflict:
                    job = None
                stored.result()
        except BaseException:  # a failed subscribe leaves no subscription (nor a lease nobody serves)
            with contextlib.suppress(Exception):
                self._subscriptions.delete(job_id, connection_id)
            raise
        if job is None:
            self._subscriptions.delete(job_id, connection_id)
            return False
        known = _Known(ended=EndMark.of(job) if job.terminal else None)
        with contextlib.suppress(HandedOver):
            _Sender(self, subscription, known, owner=self._owner, look=True, deadline_ms=deadline_ms).run()
        return True

    def deliver(
        self,
        job_id: str,
        *,
        chunks: Iterable[Chunk] = (),
        ended: EndMark | Job | None = None,
        until: int | None = None,
        end_unread: bool = False,
        access: ConnectionAccess | None = None,
        request_id: str | None = None,
    ) -> int:
        """A delivery from the chunk stream: send the job's subscribers ``chunks`` (a batch's live
        chunks; the log fills any gap before them), then ``done`` if ``ended`` (the job's end mark).
        ``until``: the highest sequence id the batch's records named (records that could not be read
        are delivered from the log up to there); ``end_unread``: the end mark's record could not be
        read (how the job ended is read from the job). Returns the number of subscriptions served.

        With ``access``, a subscriber whose connection is no longer allowed is closed (its last frame
        naming ``request_id``, the invocation delivering) and its subscription deleted instead."""
        if isinstance(ended, Job):
            ended = EndMark.of(ended)
        if end_unread and ended is None:
            job = self._jobs.get(job_id)
            ended = EndMark.of(job) if job is not None and job.terminal else None
        batch = {chunk.sequence_id: chunk for chunk in chunks}
        reach = max([*batch, until or 0, ended.last_sequence_id if ended else 0])
        made_for = END_SEQUENCE_ID if ended is not None else reach
        subscriptions = self._subscriptions.for_job(job_id, consistent=ended is not None)
        for subscription in subscriptions:
            if access is not None and not access.allowed(subscription.connection_id, subscription.key_hash):
                access.close(
                    subscription.connection_id, request_id, job_id=job_id, last_sent=subscription.last_sent
                )
                self._subscriptions.delete(job_id, subscription.connection_id)
                continue
            known = _Known(dict(batch), ended)
            _Sender(self, subscription, known, owner=STREAM, look=False, reach=(reach, made_for)).run()
        return len(subscriptions)


class _Sender:
    """One sender's pass over one subscription: claim, push, repeat; then ``done``, or stop (the chunk
    stream) or let go (the handler)."""

    def __init__(
        self,
        fanout: Fanout,
        subscription: Subscription,
        known: _Known,
        *,
        owner: str,
        look: bool,
        reach: tuple[int, int] | None = None,
        deadline_ms: int | None = None,
    ) -> None:
        self._f = fanout
        self._deadline_ms = deadline_ms  # (a handler) stop pushing by then, and hand back
        self._store = fanout._subscriptions
        self._owner = owner
        self._stream = owner == STREAM
        # A stream delivery claims no chunk past its records (``_cap``) and marks its claims with the
        # highest record it was made for (``_made_for``: END_SEQUENCE_ID for a job's end mark).
        self._cap: int | None = reach[0] if reach is not None else None
        self._made_for = reach[1] if reach is not None else 0
        self._job_id = subscription.job_id
        self._connection = subscription.connection_id
        self._cursor = subscription.last_sent
        self._known = known
        self._look = look  # (the handler) read the job and the log before concluding
        self._holding = subscription.sender == owner  # the handler holds its lease from the start
        self._served_wakes = 0  # the wakes counter as of this holder's last look
        self._pushed = subscription.last_sent  # the last message this sender knows went out
        self._read_at: int | None = None  # the cursor after which the log was last read
        self._log_more = False  # that read filled its page: more may follow
        self._read_since_end = False  # the log was read after the job's end was known
        self._first_seen = subscription

    def run(self) -> None:
        try:
            seen = self._first_seen
            if self._stream and seen.claimed_by == STREAM and self._retried(seen):
                # an earlier attempt of this delivery claimed its messages and died before they went out
                self._cursor = seen.last_sent
                if not self._push_again(seen):
                    return
            while self._step():
                pass
        except Exception:
            if self._holding:  # let the retry (or the next sender) go on at once, from what went out
                with contextlib.suppress(Exception):
                    self._store.abandon(self._job_id, self._connection, self._owner, pushed=self._pushed)
                    if not self._stream:
                        self._hand_back()
            raise

    def _hand_back(self) -> None:
        """A handler let go early (out of time, or a push failed), having released its lease: if the
        job has ended, no stream record will follow, and a stream delivery that found the lease since
        only woke the handler, so the end mark is touched for the chunk stream to deliver the end (the
        rest of the log, then ``done``) once more. A job still running needs nothing: its next chunk's
        delivery goes on from the cursor. The release comes first, so an end written after this read
        finds no lease and is delivered as usual."""
        if self._f._ends is None:
            return
        job = self._f._jobs.get(self._job_id)
        if job is not None and job.terminal:
            self._f._ends.redeliver_end(self._job_id)

    def _step(self) -> bool:
        """One message (a chunk, or ``done``), or letting go. False when this pass is over."""
        chunk = self._next_chunk()
        if chunk is not None:
            return self._send(chunk)
        ended = self._known.ended
        if ended is not None and self._cursor >= ended.last_sequence_id and self._complete():
            return self._send_done()
        return self._let_go()

    def _complete(self) -> bool:
        """Whether every chunk of the ended job was seen: a handler read the log after the end was known;
        a stream delivery needs no read (the end mark follows every chunk of the job in the stream)."""
        return self._stream or (self._read_since_end and not self._log_more)

    # ------------------------------------------------------------------ what to send next
    def _next_chunk(self) -> Chunk | None:
        if self._cap is not None and self._cursor >= self._cap:
            return None
        chunk = self._known.chunks.get(self._cursor + 1)
        if chunk is None and self._should_read():
            self._read()
            chunk = self._known.chunks.get(self._cursor + 1)
        return chunk

    def _should_read(self) -> bool:
        if self._stream:  # a gap before what it has to send: the log fills it, never past its records
            return self._read_at != self._cursor
        ended = self._known.ended
        if self._look or (ended is not None and not self._read_since_end):
            return True
        if self._read_at == self._cursor:
            return False  # read from here already and found nothing more
        return (
            self._log_more
            or any(seq > self._cursor for seq in self._known.chunks)
            or (ended is not None and self._cursor < ended.last_sequence_id)
        )

    def _read(self) -> None:
        """The log, and (a handler's look) the job beside it, at once: a first chunk sooner. Every chunk
        of a job that ended was written before its end, so a log read that began once the end was known
        holds them all; a look that finds the job ended reads the log again unless the read beside it
        already reached the job's last chunk (the log has no gap)."""
        end_known = self._known.ended is not None
        page = LOG_PAGE if self._cap is None else min(LOG_PAGE, self._cap - self._cursor)
        if self._look and not end_known:
            with ThreadPoolExecutor(1, thread_name_prefix="subscribe-look") as beside:
                looked = beside.submit(self._f._jobs.get, self._job_id)
                found = self._f._chunks.after(self._job_id, self._cursor, page)
                job = looked.result()
            if job is not None and job.terminal:
                ended = self._known.ended = EndMark.of(job)
                reached = found[-1].sequence_id if found else self._cursor
                if reached < ended.last_sequence_id and len(found) < page:
                    found = self._f._chunks.after(self._job_id, self._cursor, page)
                end_known = True
        else:
            found = self._f._chunks.after(self._job_id, self._cursor, page)
        self._known.chunks.update((c.sequence_id, c) for c in found)
        self._read_at, self._log_more, self._look = self._cursor, len(found) == page, False
        if end_known:
            self._read_since_end = True

    # ------------------------------------------------------------------ writes
    def _send(self, first: Chunk) -> bool:
        """Claim the run of consecutive chunks from ``first`` this sender holds, then push them."""
        run = [first]
        while len(run) < LOG_PAGE and (following := self._known.chunks.get(run[-1].sequence_id + 1)):
            if self._cap is not None and following.sequence_id > self._cap:
                break
            run.append(following)
        now = self._f._clock_ms()
        written = self._store.claim(
            self._job_id,
            self._connection,
            self._owner,
            prev=self._cursor,
            new=run[-1].sequence_id,
            until_ms=now + self._f._lease_ms,
            made_for=self._made_for,
        )
        if not written.applied:
            return self._lost(written.before, now)
        self._acquired(written.before)
        self._cursor = run[-1].sequence_id
        return self._push(run)

    def _push(self, chunks: list[Chunk]) -> bool:
        for chunk in chunks:
            if self._deadline_ms is not None and self._f._clock_ms() >= self._deadline_ms:
                raise HandedOver(f"out of time at {chunk.sequence_id} of {self._job_id}")
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
            made_for=self._made_for,
        )
        if not written.applied:
            return self._lost(written.before, now)  # go on from the cursor it found, if at all
        self._holding = True
        self._push_done(ended)
        return False

    def _push_done(self, ended: EndMark) -> None:
        self._f._pusher.send(self._connection, done_message(ended))  # a gone connection: deleted below
        self._holding = False
        self._store.finish(self._job_id, self._connection, self._owner)

    def _let_go(self) -> bool:
        """Nothing more to send now. The chunk stream keeps its lease (its next delivery is the same
        owner); the handler releases it. True when the handler was woken meanwhile (look again)."""
        if not self._holding or self._stream:
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
        if before.wakes != before.served and not self._stream:
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
            made_for=self._made_for,
        )
        before = written.before
        if not written.applied or before is None:
            return before is not None  # someone else took it, or it is gone
        self._holding, self._served_wakes = True, before.wakes
        self._look = not self._stream
        self._cursor, self._read_at = before.last_sent, None
        return self._push_again(before)

    def _push_again(self, claim: Subscription) -> bool:
        """Push the last claim of ``claim`` again (its sender may have died before it went out): its
        run of chunks, or ``done``. True when this sender should go on."""
        if claim.done_sent:
            ended = self._known.ended
            if ended is None:
                job = self._f._jobs.get(self._job_id)
                ended = EndMark.of(job) if job is not None and job.terminal else None
            if ended is not None:
                self._holding = True
                self._push_done(ended)
                return False
            return True
        first, last = max(claim.claimed_from, claim.start + 1), claim.last_sent
        if first > last:
            return True
        # The claim may never have gone out: until it is pushed again, what went out ends before it (a
        # push failing on the way lets go with the cursor there, and the next sender pushes it again).
        self._pushed = min(self._pushed, first - 1)
        known = [self._known.chunks.get(seq) for seq in range(first, last + 1)]
        again = [chunk for chunk in known if chunk is not None]
        if len(again) < len(known):  # read what the batch does not have
            again = self._f._chunks.after(self._job_id, first - 1, last - first + 1)
        return self._push(again)

    def _lost(self, current: Subscription | None, now: int) -> bool:
        """A claim's condition failed. True when this sender should go on (from the current cursor)."""
        self._holding = False
        if current is None:
            return False  # unsubscribed (or finished)
        if current.held_by_other(self._owner, now):
            assert current.sender is not None
            if not self._stream or current.done_sent or not self._wants_after(current.last_sent):
                return False  # the chunk stream carries on; or the holder sends done, or has it all
            woken = self._store.wake(
                self._job_id, self._connection, current.sender, now_ms=now, end=self._known.ended is not None
            )
            if woken.applied:
                return False  # the handler looks again before it lets go
            current = woken.before  # it let go meanwhile: go on from where it left the cursor
            if current is None or current.held_by_other(self._owner, now):
                return current is not None  # gone; or held by another already: try again
        if current.sender not in (None, self._owner):
            return self._take_over(current, now)  # its lease ran out
        self._holding = current.sender == self._owner
        if self._stream and current.claimed_by == STREAM and self._retried(current):
            self._cursor, self._read_at = current.last_sent, None
            return self._push_again(current)  # an earlier attempt of this batch claimed it, then died
        if current.done_sent:
            return False
        if current.last_sent != self._cursor:
            self._cursor, self._read_at = current.last_sent, None
        return True

    def _retried(self, current: Subscription) -> bool:
        """Whether the chunk stream's last claim is this delivery's own, from an earlier attempt that
        died before its pushes went out: the stream's deliveries come in order, and each claims nothing
        past its records, so a claim made for records at or past this delivery's was made for them (by
        this batch, or by the larger batch it was split from after a failure)."""
        return current.claimed_for >= self._made_for
