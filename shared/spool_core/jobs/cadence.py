"""When the worker writes a chunk, and when a reader should look for the next one.

Every chunk costs a write (and, for a WebSocket subscriber, a message and a fanout claim), so the
log's cadence is most of what a job costs in infrastructure beyond the worker's own time. The first
token is written at once (time to first token is what a reader feels most); the next chunk follows
``first_ms`` later, and each interval after that is twice the last, up to ``max_ms``, unless
``tokens`` tokens are waiting first. The defaults are DESIGN.md's: every 200 ms or 64 tokens
(``max_ms`` equal to ``first_ms``, a flat cadence), about 100 chunks for a 1,000-token answer at 50
tokens/s. With ``max_ms`` at 1.5 s (``SPOOL_FLUSH_MAX_MS``) the same answer is about 19 chunks, at
about half the infrastructure cost: it starts as fast, then comes a sentence or two at a time (see
docs/decisions.md, "Chunk cadence").

Readers poll the log (a Server-Sent Events stream, a long-polling chunk page): knowing the cadence,
they look for chunk ``n + 1`` when it is due (from the write times and sizes of the chunks they hold,
and the job's token budget when they know it: the last chunk comes early) and at least every 250 ms
(an answer may end before its budget), instead of every 50-100 ms: a 20 s answer costs a few reads
per chunk, not hundreds. Before the first chunk they poll every 10 ms, then every 25 ms (time to
first token); after it, they look once more 50 ms later (a fast model's next chunks are written by then).
"""

from __future__ import annotations

from typing import NamedTuple

# A reader first looks this long after a chunk is due (the worker writes at the first token after the
# interval, and the write takes a few ms), then polls between these bounds until it comes. A look that
# misses is most often a write a little late (a busy worker): the first poll after it comes soon.
LOOK_AFTER_MS = 30
MIN_POLL_MS = 25
MAX_POLL_MS = 100
# A reader never waits longer than this between looks (an answer that ends early is seen as soon).
LOOK_CEILING_MS = 250
# After a chunk whose pace it cannot tell (a first chunk: one token, written at once), a reader looks
# once more this soon before it waits for the cadence: a fast model fills the token cap in tens of
# ms, and a short answer is then all written long before the next interval ends (it waited ~200 ms
# for a 200-token answer written in 30 ms).
EARLY_LOOK_MS = 50
# Before the first chunk a reader polls this often for a while: the first token is written at once.
# Every 10 ms for the first 200 ms (a warm job's first token comes within ~100 ms of its creation),
# then every 25 ms until a second has gone by: at most ~50 looks, each a small eventually
# consistent query.
FIRST_POLL_MS = 10
FIRST_POLL_SOON_FOR_MS = 200
LATER_FIRST_POLL_MS = 25
FIRST_POLL_FOR_MS = 1000


class Cadence(NamedTuple):
    first_ms: int = 200  # SPOOL_FLUSH_MS: from the first chunk to the second
    max_ms: int = 200  # SPOOL_FLUSH_MAX_MS: the longest interval (as first_ms: a flat cadence)
    tokens: int = 64  # SPOOL_FLUSH_TOKENS: a chunk is written once this many tokens wait

    def interval_ms(self, sequence_id: int) -> int:
        """How long after chunk ``sequence_id`` the next one is written at the latest (``tokens`` may
        come first). 0 before the first chunk: the first token is written at once."""
        if sequence_id <= 0:
            return 0
        return min(self.max_ms, self.first_ms << min(sequence_id - 1, 16))

    def next_due_ms(
        self,
        sequence_id: int,
        created_ms: int,
        previous_created_ms: int | None,
        tokens: int = 0,
        remaining: int | None = None,
    ) -> int:
        """When chunk ``sequence_id + 1`` is expected (epoch ms), from when ``sequence_id`` was written
        and, if known, the chunk before it: ``tokens`` tokens came in that gap, so the token cap's worth
        (or the ``remaining`` tokens of the job's budget, if fewer: its last chunk) comes in
        ``gap * cap / tokens``, maybe before the interval ends. Without a token count, a gap shorter
        than the cadence's interval for it means the cap wrote it, and the next one will likely come
        as quick."""
        interval = self.interval_ms(sequence_id)
        if previous_created_ms is not None:
            gap = created_ms - previous_created_ms
            if gap > 0 and tokens > 0:
                coming = self.tokens if remaining is None else max(1, min(self.tokens, remaining))
                interval = min(interval, gap * coming // tokens)
            elif 0 < gap < self.interval_ms(sequence_id - 1):
                interval = min(interval, gap)
        return created_ms + interval


def next_poll_ms(previous_ms: int) -> int:
    """The poll after an empty one: 1.5x longer, within the bounds."""
    return max(MIN_POLL_MS, min(int(previous_ms * 1.5), MAX_POLL_MS))


class Watch:
    """A reader's pacing over one job's log: after a chunk, it looks just after the next one is due, and
    at least every ``LOOK_CEILING_MS``; once that time has passed, it polls, backing off from 25 to
    100 ms. Before the first chunk it polls every 10 ms, then every 25 ms, for a while, then backs off
    likewise.
    ``budget``: the job's token budget (``max_tokens``), when the reader knows it."""

    def __init__(self, cadence: Cadence, budget: int | None = None) -> None:
        self._cadence = cadence
        self._budget = budget
        self._last: tuple[int, int] | None = None  # (sequence id, written at ms) of the newest chunk seen
        self._due_ms: int | None = None  # when the next one is expected
        self._early_ms: int | None = None  # a look before that, when the pace is not known yet
        self._poll_ms = MIN_POLL_MS
        self._first_wait_ms: int | None = None  # when it first waited for a first chunk
        self.started = False  # whether the reader has looked at the log yet

    def saw(self, sequence_id: int, created_ms: int | None, tokens: int = 0, tokens_total: int = 0) -> None:
        """A chunk arrived (in order). ``created_ms``: when it was written (None: unknown); ``tokens``:
        how many it holds, ``tokens_total``: how many the job had then (0: unknown)."""
        if created_ms is None:
            self._last = self._due_ms = self._early_ms = None
        else:
            previous = self._last[1] if self._last and self._last[0] == sequence_id - 1 else None
            self._last = (sequence_id, created_ms)
            remaining = self._budget - tokens_total if self._budget and tokens_total else None
            self._due_ms = self._cadence.next_due_ms(sequence_id, created_ms, previous, tokens, remaining)
            self._early_ms = created_ms + EARLY_LOOK_MS if previous is None else None
        self._poll_ms = MIN_POLL_MS

    def wait_ms(self, now_ms: int) -> int:
        """How long to wait before the next look."""
        early, self._early_ms = self._early_ms, None
        if early is not None and now_ms < early and (self._due_ms is None or early < self._due_ms):
            return max(FIRST_POLL_MS, early - now_ms)
        if self._due_ms is not None and now_ms < self._due_ms + LOOK_AFTER_MS:
            return max(MIN_POLL_MS, min(self._due_ms + LOOK_AFTER_MS - now_ms, LOOK_CEILING_MS))
        if self._last is None:  # no chunk yet: the first token is written at once
            self._first_wait_ms = now_ms if self._first_wait_ms is None else self._first_wait_ms
            waited = now_ms - self._first_wait_ms
            if waited < FIRST_POLL_SOON_FOR_MS:
                return FIRST_POLL_MS
            if waited < FIRST_POLL_FOR_MS:
                return LATER_FIRST_POLL_MS
        wait, self._poll_ms = self._poll_ms, next_poll_ms(self._poll_ms)
        return wait
