"""Ends a dead subscribe handler held back: the sweeper has the chunk stream deliver them again.

The subscribe handler holds its subscription's sending lease from the moment it stores it until it
lets go; a stream delivery that finds the lease live wakes the handler instead of sending, and the
handler looks again before it lets go. A handler killed outright (out of memory, its runtime gone:
nothing runs to let go) strands what only it would have sent: a running job's next chunk takes the
lease over once it runs out, but after the job's end no record follows (the end woke the dead holder,
or had been delivered before the subscription existed), and the subscriber would get the rest and
``done`` only by subscribing again.

So a subscription is due (``end_due_ms``, in a sparse index of every tenant's subscriptions) from its
creation until its handler lets go, and again whenever the job's end wakes a holder: due by the
holder's lease as it then stood. The sweeper, every minute, looks at each due subscription (a
consistent read): one whose lease is still live is left to its holder until that lease ends (the
holder's invocation times out before its lease does); one whose job has ended is delivered its end
again (the end mark touched, even one written while nobody was subscribed: its delivery takes the
lease over and sends the rest and ``done``, as after any take-over); one whose job is still running
is looked at again a lease later (its live chunks take the lease over; but a handler killed before
its mark on the job applied leaves chunks nobody marks live, and only the end's redelivery sends
them). A subscription leaves the index when its handler lets go, or with the subscription (``done``
sent, the connection gone); the sweeper only ever postpones. After a take-over the dead holder's last
claim goes out again, ``done`` included: a client keeps the first ``done`` it gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spool_core.observability import logger
from spool_core.subscriptions import LEASE_MS, EndMarks
from spool_core.tenancy import InvalidTenantId
from spool_core.units import now_ms


@dataclass(frozen=True)
class DueEnd:
    tenant_id: str
    job_id: str
    connection_id: str
    due_ms: int  # when the end is due by (the holder's lease when it was marked, or a later look)


class DueEnds(Protocol):
    def due_before(self, now_ms: int, limit: int) -> list[DueEnd]:
        """Subscriptions of every tenant due before ``now_ms``, oldest first (an index: it may lag)."""

    def lease_of(self, end: DueEnd) -> int | None:
        """The subscription's sending lease, read consistently (0: nobody holds it; None: it is gone)."""

    def postpone(self, end: DueEnd, until_ms: int | None) -> None:
        """Due again at ``until_ms``; ``None``: no longer due. Nothing for a subscription gone meanwhile."""


class DueEndSweeper:
    def __init__(
        self,
        due: DueEnds,
        end_marks: Callable[[str], EndMarks],
        *,
        clock_ms: Callable[[], int] = now_ms,
        lease_ms: int = LEASE_MS,
        batch: int = 100,
    ) -> None:
        self._due = due
        self._end_marks = end_marks  # the tenant's chunk log
        self._clock_ms = clock_ms
        self._lease_ms = lease_ms
        self._batch = batch

    def sweep(self) -> list[str]:
        """Redeliver the end of every due subscription of an ended job that nobody holds any more;
        returns the jobs' ids."""
        now = self._clock_ms()
        redelivered: list[str] = []
        for end in self._due.due_before(now, self._batch):
            try:
                marks = self._end_marks(end.tenant_id)
                lease = self._due.lease_of(end)
            except InvalidTenantId:
                logger.error("due subscription with an invalid tenant id", extra={"job_id": end.job_id})
                continue
            if lease is None:
                continue  # gone (done, or unsubscribed)
            if lease >= now:  # its holder is alive: it serves what woke it; looked at when its lease ends
                self._due.postpone(end, lease)
                continue
            self._due.postpone(end, now + self._lease_ms)  # looked at again a lease later, if still there
            if not marks.redeliver_end(end.job_id):
                # Running. Its live chunks take the lease over; but a handler killed before its mark on
                # the job applied left a job whose chunks nobody marks live: the end's redelivery will.
                continue
            redelivered.append(end.job_id)
            logger.warning(
                "a job's end held back by a dead subscribe handler delivered again",
                extra={"job_id": end.job_id, "connection_id": end.connection_id, "due_ms": end.due_ms},
            )
        return redelivered
