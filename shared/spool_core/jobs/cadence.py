"""When the worker writes a chunk, and when a reader should look for the next one.

Every chunk costs a write (and, for a WebSocket subscriber, a message and a fanout claim), so the
log's cadence is most of what a job costs in infrastructure beyond the worker's own time. The first
token is written at once (time to first token is what a reader feels most); the next chunk follows
``first_ms`` later, and each interval after that is twice the last, up to ``max_ms``, unless
``tokens`` tokens are waiting first. At 50 tokens/s with the defaults (200 ms, 1.5 s, 64 tokens) a
1,000-token answer is about 19 chunks instead of about 100 at a flat 200 ms: the answer starts as
fast, then comes a sentence or two at a time (see docs/decisions.md, "Chunk cadence").

Readers poll the log (a Server-Sent Events stream, a long-polling chunk page): knowing the cadence,
they look for chunk ``n + 1`` when it is due instead of every 50-100 ms, so a 20 s answer
costs a few reads per chunk, not hundreds, with the same delivery delay.
"""

from __future__ import annotations

from dataclasses import dataclass

# A reader first looks this long after a chunk is due (the worker writes at the first token after the
# interval, and the write takes a few ms), then polls between these bounds until it comes.
LOOK_AFTER_MS = 30
MIN_POLL_MS = 50
MAX_POLL_MS = 100


@dataclass(frozen=True)
class Cadence:
    first_ms: int = 200  # SPOOL_FLUSH_MS: from the first chunk to the second
    max_ms: int = 1500  # SPOOL_FLUSH_MAX_MS: the longest interval
    tokens: int = 64  # SPOOL_FLUSH_TOKENS: a chunk is written once this many tokens wait

    def interval_ms(self, sequence_id: int) -> int:
        """How long after chunk ``sequence_id`` the next one is written at the latest (``tokens`` may
        come first). 0 before the first chunk: the first token is written at once."""
        if sequence_id <= 0:
            return 0
        return min(self.max_ms, self.first_ms << min(sequence_id - 1, 16))

    def next_due_ms(
        self, sequence_id: int, created_ms: int, previous_created_ms: int | None, tokens: int = 0
    ) -> int:
        """When chunk ``sequence_id + 1`` is expected (epoch ms), from when ``sequence_id`` was written
        and, if known, the chunk before it: ``tokens`` tokens came in that gap, so the token cap's worth
        comes in ``gap * cap / tokens`` (the cap may write the next chunk before the interval ends);
        without a token count, a gap shorter than the cadence's interval for it means the cap wrote
        it, and the next one will likely come as quick."""
        interval = self.interval_ms(sequence_id)
        if previous_created_ms is not None:
            gap = created_ms - previous_created_ms
            if gap > 0 and tokens > 0:
                interval = min(interval, gap * self.tokens // tokens)
            elif 0 < gap < self.interval_ms(sequence_id - 1):
                interval = min(interval, gap)
        return created_ms + interval

    def first_look_ms(self, due_ms: int, now_ms: int) -> int:
        """How long a reader waits before looking for a chunk due at ``due_ms`` (at least the shortest
        poll, at most the cadence's longest interval: a clock that disagrees cannot stall a reader)."""
        return max(MIN_POLL_MS, min(due_ms + LOOK_AFTER_MS - now_ms, self.max_ms))


def next_poll_ms(previous_ms: int) -> int:
    """The poll after an empty one: 1.5x longer, within the bounds."""
    return max(MIN_POLL_MS, min(int(previous_ms * 1.5), MAX_POLL_MS))


class Watch:
    """A reader's pacing over one job's log: after a chunk, the first look comes just after the next
    one is due; then, and before any chunk was seen, polls back off from 50 to 100 ms."""

    def __init__(self, cadence: Cadence) -> None:
        self._cadence = cadence
        self._last: tuple[int, int] | None = None  # (sequence id, written at ms) of the newest chunk seen
        self._previous_ms: int | None = None  # when the chunk before it was written
        self._due_ms: int | None = None  # when the next one is expected, until the first look for it
        self._poll_ms = MIN_POLL_MS
        self.started = False  # whether the reader has looked at the log yet

    def saw(self, sequence_id: int, created_ms: int | None, tokens: int = 0) -> None:
        """A chunk arrived (in order). ``created_ms``: when it was written (None: unknown); ``tokens``:
        how many it holds (0: unknown)."""
        if created_ms is None:
            self._last = self._previous_ms = self._due_ms = None
        else:
            previous = self._last[1] if self._last and self._last[0] == sequence_id - 1 else None
            self._last, self._previous_ms = (sequence_id, created_ms), previous
            self._due_ms = self._cadence.next_due_ms(sequence_id, created_ms, previous, tokens)
        self._poll_ms = MIN_POLL_MS

    def wait_ms(self, now_ms: int) -> int:
        """How long to wait before the next look."""
        if self._due_ms is not None:
            due, self._due_ms = self._due_ms, None
            return self._cadence.first_look_ms(due, now_ms)
        wait, self._poll_ms = self._poll_ms, next_poll_ms(self._poll_ms)
        return wait
