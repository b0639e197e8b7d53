"""The chunk cadence: when the worker writes, and when a reader looks for the next chunk."""

from __future__ import annotations

from collections.abc import Iterator

from spool_core.jobs.cadence import (
    EARLY_LOOK_MS,
    FIRST_POLL_FOR_MS,
    FIRST_POLL_MS,
    FIRST_POLL_SOON_FOR_MS,
    LATER_FIRST_POLL_MS,
    LOOK_AFTER_MS,
    LOOK_CEILING_MS,
    MAX_POLL_MS,
    MIN_POLL_MS,
    Cadence,
    Watch,
    next_poll_ms,
)
from spool_core.jobs.chunk_writer import ChunkWriter
from spool_core.jobs.model import Chunk


class ListLog:
    def __init__(self) -> None:
        self.chunks: list[Chunk] = []

    def append(self, job_id: str, chunk: Chunk) -> None:
        assert chunk.sequence_id == (self.chunks[-1].sequence_id if self.chunks else 0) + 1
        self.chunks.append(chunk)

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        return [c for c in self.chunks if c.sequence_id > after][:limit]

    def last(self, job_id: str) -> Chunk | None:
        return self.chunks[-1] if self.chunks else None

    def all(self, job_id: str) -> Iterator[Chunk]:
        return iter(self.chunks)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


DEFAULT = Cadence()  # DESIGN.md's: every 200 ms or 64 tokens
RAMP = Cadence(first_ms=200, max_ms=1500, tokens=64)  # SPOOL_FLUSH_MAX_MS=1500


def stream(
    tokens: int, per_second: float, *, cadence: Cadence = DEFAULT, last: Chunk | None = None
) -> ListLog:
    """``tokens`` one-token deltas at ``per_second`` through a writer; the log it wrote."""
    log, clock = ListLog(), Clock()
    if last is not None:
        log.chunks = [last]
    writer = ChunkWriter(log, "job_x", last, writer="w", cadence=cadence, clock=clock, on_flush=lambda: None)
    for index in range(tokens):
        clock.now += 1 / per_second
        writer.add(f"t{index} ", 1)
    writer.flush()
    return log


def test_intervals_double_from_the_first_to_the_longest() -> None:
    cadence = Cadence(first_ms=200, max_ms=1500, tokens=64)
    assert [cadence.interval_ms(n) for n in range(7)] == [0, 200, 400, 800, 1500, 1500, 1500]
    assert Cadence(first_ms=200, max_ms=200).interval_ms(9) == 200  # a flat cadence, if configured
    assert cadence._replace(max_ms=1500).interval_ms(10**6) == 1500  # no overflow however long the job
    assert [Cadence().interval_ms(n) for n in range(4)] == [0, 200, 200, 200]  # DESIGN.md's, by default


def test_by_default_a_chunk_every_200_ms_as_design_md_says() -> None:
    log = stream(1000, 50.0)
    assert 88 <= len(log.chunks) <= 102 and log.chunks[0].tokens == 1
    # 200 ms of tokens at 50 per second, written with the first token past the interval
    assert {c.tokens for c in log.chunks[1:-1]} <= {10, 11}
    assert "".join(c.text for c in log.chunks) == "".join(f"t{i} " for i in range(1000))


def test_with_the_ramp_a_thousand_tokens_at_fifty_per_second_make_about_twenty_chunks() -> None:
    log = stream(1000, 50.0, cadence=RAMP)
    assert 17 <= len(log.chunks) <= 21  # about 100 at a flat 200 ms
    assert log.chunks[0].tokens == 1  # the first token at once
    assert [c.sequence_id for c in log.chunks] == list(range(1, len(log.chunks) + 1))
    assert "".join(c.text for c in log.chunks) == "".join(f"t{i} " for i in range(1000))
    assert max(c.tokens for c in log.chunks) <= 64
    assert log.chunks[-1].tokens_total == 1000


def test_a_fast_model_is_cut_by_the_token_cap() -> None:
    log = stream(1000, 5000.0)
    assert all(c.tokens <= 64 for c in log.chunks)
    assert len(log.chunks) >= 1000 // 64


def test_a_flat_cadence_still_writes_every_interval() -> None:
    log = stream(200, 50.0, cadence=Cadence(first_ms=200, max_ms=200))
    assert 19 <= len(log.chunks) <= 22  # 4 s at 200 ms


def test_a_resumed_attempt_writes_its_first_token_at_once() -> None:
    previous = Chunk(sequence_id=9, text="before ", created_at="x", tokens=40, tokens_total=300)
    log = stream(100, 50.0, last=previous)
    assert log.chunks[1].sequence_id == 10 and log.chunks[1].tokens == 1
    assert log.chunks[-1].tokens_total == 400


def test_when_the_next_chunk_is_due() -> None:
    cadence = Cadence(first_ms=200, max_ms=1500, tokens=64)
    written = 1_000_000
    assert cadence.next_due_ms(5, written, written - 1500) == written + 1500
    # a chunk the token cap wrote early: the next is expected as soon
    assert cadence.next_due_ms(5, written, written - 300) == written + 300
    # chunk 2, on the cadence 200 ms after the first: the next is due 400 ms after it
    assert cadence.next_due_ms(2, written, written - 210) == written + 400
    # with its token count: 40 tokens in 800 ms, so 64 come in 1,280 ms, before the 1.5 s interval
    assert cadence.next_due_ms(4, written, written - 800, tokens=40) == written + 1280
    assert cadence.next_due_ms(4, written, written - 800, tokens=10) == written + 1500  # a slow model
    # 20 tokens left of the job's budget: its last chunk comes in 400 ms
    assert cadence.next_due_ms(4, written, written - 800, tokens=40, remaining=20) == written + 400


def test_a_reader_looks_when_a_chunk_is_due_and_at_least_every_quarter_second() -> None:
    watch = Watch(RAMP)
    start = 1_000_000
    assert watch.wait_ms(start) == FIRST_POLL_MS  # nothing yet: the first token is written at once
    assert watch.wait_ms(start + FIRST_POLL_SOON_FOR_MS - 1) == FIRST_POLL_MS
    assert watch.wait_ms(start + FIRST_POLL_SOON_FOR_MS) == LATER_FIRST_POLL_MS  # less often
    assert watch.wait_ms(start + FIRST_POLL_FOR_MS) == MIN_POLL_MS  # then backs off
    watch.saw(1, start, 1, 1)
    assert watch.wait_ms(start + 10) == EARLY_LOOK_MS - 10  # once soon: a fast model's chunk 2
    assert watch.wait_ms(start + 50) == 200 + LOOK_AFTER_MS - 50  # then when chunk 2 is due
    watch.saw(1, start, 1, 1)
    assert watch.wait_ms(start + 60) == 200 + LOOK_AFTER_MS - 60  # seen late: no early look to make
    watch.saw(2, start + 200, 10, 11)
    watch.saw(3, start + 600, 20, 31)
    watch.saw(4, start + 1400, 40, 71)  # 64 more come 1,280 ms after it
    assert watch.wait_ms(start + 1410) == LOOK_CEILING_MS  # never longer than the ceiling
    assert watch.wait_ms(start + 2500) == 1400 + 1280 + LOOK_AFTER_MS - 2500
    assert watch.wait_ms(start + 2711) == MIN_POLL_MS == 25  # past due: poll soon, then backing off
    assert [watch.wait_ms(start + 2736) for _ in range(4)] == [37, 55, 82, MAX_POLL_MS]
    budgeted = Watch(RAMP, budget=80)
    budgeted.saw(3, start, 20, 31)
    budgeted.saw(4, start + 800, 40, 71)
    assert budgeted.wait_ms(start + 800) == 180 + LOOK_AFTER_MS  # 9 tokens left: 180 ms


def test_polls_after_an_empty_one_back_off_within_bounds() -> None:
    assert next_poll_ms(MIN_POLL_MS) == 37
    assert next_poll_ms(75) == MAX_POLL_MS
    assert next_poll_ms(1500) == MAX_POLL_MS
