"""A provider's stream, read with a deadline: a stalled provider is a retryable error, and an
invocation whose time runs out while it waits hands its job over instead of dying with it.

Without this, the worker looked at the clock only when a token arrived. A provider that stopped
sending held the read until the HTTP client's own timeout (120 s, the worker's whole time limit), so
the invocation was killed mid-read and the job waited out its message's visibility (~12 minutes on
AWS) before anything tried again.

The stream is read by a thread of its own and handed over through a queue, so the waiting side can
give up at a deadline whatever the provider's client is blocked in (an HTTP read, an event stream,
a simulated delay); no client exposes a read that can be interrupted from outside. When the waiting
side gives up, the reader is told to stop: it closes the provider's stream at its next event, or
leaves with its call when the client's own timeout ends it.

While nothing comes, the waiting side is handed a ``TICK`` whenever its ``upkeep`` says it is due
(the worker writes the tokens that wait in its buffer every flush interval, and looks at the job's
cancel and renews its lease, however long the provider pauses or takes to send its first token).

The reader reads an event only when the waiting side asks for one, as a generator iterated in place
would: the provider is never ahead of what the worker has taken. A reader that ran ahead let a
simulated crash at token 40 (which ends the process from the provider's own code, as a Lambda kill
would end it anywhere) come before the worker had written even the first token, which is written at
once: a job crashed three times that way dead-lettered with nothing in its log.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from spool_core.providers import ProviderError

_END = object()
# Past the deadline, what the provider has ready when asked is still taken (an answer read to its end
# is ended, never handed over to be asked for again); this long is given to read it.
READY_SECONDS = 0.1


# The shortest wait for an event before a tick: an upkeep due now does not spin against a reader
# about to hand over an event.
MIN_TICK_SECONDS = 0.01


class Tick:
    """Nothing came, and the waiting side's upkeep is due (``WatchedStream``'s ``upkeep``)."""


TICK = Tick()


class OutOfTime(Exception):
    """The invocation's time is up: the job is handed over to a new one."""


class Stalled(ProviderError):
    """The provider sent nothing for the stall limit: retryable, from what was persisted."""

    CODE = "provider_stalled"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"The provider sent nothing for {seconds:g} s", retryable=True, code=self.CODE)


class WatchedStream[T]:
    """Iterate ``events`` (a provider's stream), raising ``Stalled`` (a retryable ``ProviderError``)
    when nothing comes for ``stall_seconds`` and ``OutOfTime`` when the ``seconds_left`` (None: no
    limit) run out first; ``TICK`` when nothing has come by the time ``upkeep`` (seconds until the
    waiting side's next upkeep) says. Use it as a context manager, so the reader is told to stop
    however the iteration ends."""

    def __init__(
        self,
        events: Iterable[T],
        *,
        stall_seconds: float,
        seconds_left: float | None = None,
        upkeep: Callable[[], float] | None = None,
    ) -> None:
        self._events = events
        self._stall_seconds = stall_seconds
        self._upkeep = upkeep
        self._asked_at = 0.0  # when the event waited for was asked for: the stall counts from then
        self._deadline = None if seconds_left is None else time.monotonic() + seconds_left
        self._queue: queue.SimpleQueue[tuple[object, BaseException | None]] = queue.SimpleQueue()
        self._asked = threading.Semaphore(0)  # released once per event the waiting side asks for
        self._pending = False  # an event was asked for and has not come yet
        self._stop = threading.Event()
        self._done = False
        self._reader = threading.Thread(target=self._read, name="provider-stream", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        events = iter(self._events)
        try:
            while True:
                self._asked.acquire()
                if self._stop.is_set():
                    break
                try:
                    event = next(events)
                except StopIteration:
                    self._queue.put((_END, None))
                    break
                self._queue.put((event, None))
        except BaseException as exc:  # the provider's error (or a simulated crash) is the reader's to raise
            self._queue.put((_END, exc))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T | Tick]:
        return self

    def __next__(self) -> T | Tick:
        if self._done:
            raise StopIteration
        now = time.monotonic()
        if not self._pending:
            self._pending, self._asked_at = True, now
            self._asked.release()
        wait, why = self._asked_at + self._stall_seconds - now, "stall"
        left = None if self._deadline is None else self._deadline - now
        if left is not None and left < wait:
            # What is ready is taken however late: an answer read to its end (its usage included) is
            # ended, never handed over to be asked for again.
            wait, why = max(READY_SECONDS, left), "deadline"
        if self._upkeep is not None:
            upkeep = max(MIN_TICK_SECONDS, self._upkeep())
            if upkeep < wait:
                wait, why = upkeep, "upkeep"
        try:
            item, error = self._queue.get(timeout=max(0.0, wait))
        except queue.Empty:
            if why == "upkeep":
                return TICK  # the event asked for is still awaited
            self.close()
            if why == "deadline":
                raise OutOfTime from None
            raise Stalled(self._stall_seconds) from None
        self._pending = False
        if error is not None:
            self._done = True
            raise error
        if item is _END:
            self._done = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Tell the reader to stop (it closes the provider's stream at its next event)."""
        self._done = True
        self._stop.set()
        self._asked.release()  # a reader waiting to be asked leaves (and closes the stream) at once

    def __enter__(self) -> WatchedStream[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
