"""Coalescing the provider's tokens into the chunk log."""

from __future__ import annotations

from collections.abc import Callable

from spool_core.clock import from_epoch, rfc3339
from spool_core.jobs.cadence import Cadence
from spool_core.jobs.model import Chunk, Progress
from spool_core.jobs.ports import ChunkLog, Conflict


class LostLease(Exception):
    """Another attempt owns the job now (this one stalled past its lease, or was superseded)."""


class ChunkWriter:
    """Coalesces tokens into chunks as the ``Cadence`` says: an attempt's first token at once, then at
    growing intervals or every ``cadence.tokens`` tokens, whichever comes first. The interval is
    counted from the end of the last write, so a slow store makes chunks larger, never smaller (a
    write that outlasts the interval used to leave every later chunk one token long)."""

    def __init__(
        self,
        log: ChunkLog,
        job_id: str,
        last: Chunk | None,
        *,
        writer: str,
        cadence: Cadence,
        clock: Callable[[], float],
        on_flush: Callable[[], None],
        live: bool = False,
    ) -> None:
        self._log = log
        self._job_id = job_id
        self._writer = writer
        self.sequence_id = last.sequence_id if last else 0
        self.tokens_total = last.tokens_total if last else 0
        self.first_chunk_at: str | None = None
        self._cadence = cadence
        # Chunks are marked live once the job has a WebSocket subscriber (and the first chunk always):
        # only those reach the fanout.
        self.live = live
        self._written = 0  # chunks this attempt wrote
        self._clock = clock
        self._on_flush = on_flush
        self._buffer: list[str] = []
        self._buffered_tokens = 0
        self._last_flush = clock()

    @property
    def tokens_received(self) -> int:
        """Every token given to ``add``: the written ones and those waiting for the next flush."""
        return self.tokens_total + self._buffered_tokens

    def due_in(self) -> float | None:
        """Seconds until the tokens waiting in the buffer are to be written, whether or not more come
        (None: none wait)."""
        if not self._buffer:
            return None
        return self._cadence.interval_ms(self.sequence_id) / 1000 - (self._clock() - self._last_flush)

    @property
    def last_flush_at(self) -> float:
        return self._last_flush

    def add(self, text: str, tokens: int) -> None:
        self._buffer.append(text)
        self._buffered_tokens += tokens
        first = self._written == 0  # a reader that waited for this attempt sees it start at once
        due = (self._clock() - self._last_flush) * 1000 >= self._cadence.interval_ms(self.sequence_id)
        if first or due or self._buffered_tokens >= self._cadence.tokens:
            self.flush()

    def flush(self, *, notify: bool = True) -> None:
        """Write the buffered tokens as the next chunk. ``notify`` runs the flush hook (cancel check,
        time check, lease renewal, whether the job has a subscriber) first, so the chunk is written
        knowing what the job's item said just before (a job subscribed to before its first token has
        a live first chunk); the hook may raise instead (the caller then writes the buffer with
        ``notify=False``)."""
        if not self._buffer:
            return
        if notify:
            self._on_flush()
        chunk = Chunk(
            sequence_id=self.sequence_id + 1,
            text="".join(self._buffer),
            created_at=rfc3339(from_epoch(self._clock())),
            tokens=self._buffered_tokens,
            tokens_total=self.tokens_total + self._buffered_tokens,
            writer=self._writer,
            # A job's first chunk is always live: a client that subscribes as the job starts (the usual
            # case) may do so between the worker's last look and this write, and would otherwise get
            # its first token only with the next live chunk, a cadence interval later. It costs one
            # fanout invocation per job, which finds no subscription when there is none.
            live=True if self.live or self.sequence_id == 0 else None,
        )
        try:
            self._log.append(self._job_id, chunk)
        except Conflict:
            raise LostLease(f"sequence {chunk.sequence_id} was written by another attempt") from None
        self.sequence_id, self.tokens_total = chunk.sequence_id, chunk.tokens_total
        if chunk.sequence_id == 1:  # the job's first token (an attempt resuming after a crash has none)
            self.first_chunk_at = chunk.created_at
        self._buffer, self._buffered_tokens = [], 0
        self._written += 1
        self._last_flush = self._clock()

    @property
    def progress(self) -> Progress:
        return Progress(
            tokens_generated=self.tokens_total,
            last_sequence_id=self.sequence_id,
            chunks_written=self.sequence_id,
        )
