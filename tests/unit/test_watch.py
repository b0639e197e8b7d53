"""A provider's stream read with a deadline (spool_core.jobs.watch): a provider that stops sending is
a retryable error after the stall limit, an invocation out of time gives up waiting, and however the
reading ends the provider's stream is closed, in the reader's own thread, at its next event."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from spool_core.jobs.watch import TICK, OutOfTime, WatchedStream
from spool_core.providers import ProviderError

WAIT = 30  # seconds: a deadline for the reader's thread, never expected to be reached


class Stalling:
    """A stream that yields ``before`` events, then blocks until released, then yields one more."""

    def __init__(self, before: int) -> None:
        self.before = before
        self.release = threading.Event()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            yield from range(self.before)
            self.release.wait(WAIT)
            yield self.before
        finally:
            self.closed.set()


def test_events_pass_in_order_and_the_end_ends_the_iteration() -> None:
    with WatchedStream(iter(range(500)), stall_seconds=WAIT, seconds_left=WAIT) as events:
        assert list(events) == list(range(500))
        assert list(events) == []  # an ended stream stays ended


def test_a_provider_error_is_raised_as_it_was() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise ProviderError("refused", retryable=False, code="provider_error")

    with WatchedStream(failing(), stall_seconds=WAIT) as events:
        assert next(events) == 1
        with pytest.raises(ProviderError) as raised:
            next(events)
    assert raised.value.code == "provider_error" and not raised.value.retryable


def test_a_crash_in_the_reader_reaches_the_waiting_side() -> None:
    class Died(BaseException):
        pass

    def dying() -> Iterator[int]:
        raise Died
        yield 0

    with WatchedStream(dying(), stall_seconds=WAIT) as events, pytest.raises(Died):
        next(events)


def test_a_stall_is_a_retryable_provider_error_and_the_stream_is_closed() -> None:
    stream = Stalling(before=3)
    with WatchedStream(iter(stream), stall_seconds=0.05) as events:
        assert [next(events) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ProviderError) as raised:
            next(events)
        assert list(events) == []  # given up: nothing more is read from it
    assert raised.value.retryable and raised.value.code == "provider_stalled"
    assert "sent nothing for 0.05 s" in str(raised.value)
    stream.release.set()  # the provider's next event: the reader stops there and closes it
    assert stream.closed.wait(WAIT)


def test_out_of_time_while_waiting() -> None:
    stream = Stalling(before=1)
    with WatchedStream(iter(stream), stall_seconds=WAIT, seconds_left=0.05) as events:
        assert next(events) == 0
        with pytest.raises(OutOfTime):
            next(events)
    stream.release.set()
    assert stream.closed.wait(WAIT)


def test_no_time_left_gives_up_without_waiting() -> None:
    stream = Stalling(before=0)
    with (
        WatchedStream(iter(stream), stall_seconds=WAIT, seconds_left=0) as events,
        pytest.raises(OutOfTime),
    ):
        next(events)
    stream.release.set()
    assert stream.closed.wait(WAIT)


def test_leaving_early_closes_the_stream_at_its_next_event() -> None:
    stream = Stalling(before=2)
    with WatchedStream(iter(stream), stall_seconds=WAIT) as events:
        assert next(events) == 0
    stream.release.set()
    assert stream.closed.wait(WAIT)


def test_what_is_ready_is_taken_past_the_deadline() -> None:
    """An answer read to its end is ended, not handed over: the reviewer's job had its last event
    waiting when the deadline passed, and it was asked for again in a new invocation."""
    with WatchedStream(iter(range(3)), stall_seconds=WAIT, seconds_left=WAIT) as events:
        assert next(events) == 0
        events._deadline = 0.0  # long past; the provider has the rest ready
        assert list(events) == [1, 2]


def test_the_provider_is_read_only_as_far_as_asked() -> None:
    """A reader that ran ahead let a simulated crash at token 40 (the provider's own code ending the
    process) come before the worker had written the first token, which it writes at once."""
    produced: list[int] = []

    def provider() -> Iterator[int]:
        for index in range(100):
            produced.append(index)
            yield index

    with WatchedStream(provider(), stall_seconds=WAIT) as events:
        assert [next(events) for _ in range(3)] == [0, 1, 2]
        events._reader.join(0.2)  # time to run ahead, were it to: it is still waiting to be asked
        assert events._reader.is_alive() and produced == [0, 1, 2]
        assert next(events) == 3 and produced == [0, 1, 2, 3]


def test_ticks_come_while_the_provider_pauses_and_do_not_put_off_the_stall() -> None:
    """The waiting side gets a ``TICK`` each time its upkeep is due while nothing comes (the worker
    writes its buffer and looks after its job then); the stall limit still counts from the ask."""
    stream = Stalling(before=1)
    ticks = 0
    with WatchedStream(iter(stream), stall_seconds=WAIT, seconds_left=WAIT, upkeep=lambda: 0.01) as events:
        assert next(events) == 0
        while (event := next(events)) is TICK:
            ticks += 1
            if ticks == 3:
                stream.release.set()
        assert event == 1 and ticks >= 3
    stalled = Stalling(before=0)
    seen: list[object] = []
    events = WatchedStream(iter(stalled), stall_seconds=0.3, upkeep=lambda: 0.01)
    with events, pytest.raises(ProviderError, match="sent nothing"):
        seen.extend(events)
    assert seen and all(event is TICK for event in seen)  # until the stall, counted from the ask
    stalled.release.set()
    assert stalled.closed.wait(WAIT)
