"""What ``spool`` draws on a terminal, with rich: an answer streaming on stdout with a status line
below it that never touches the answer's text, progress bars for uploads, tables.

The status line is a transient ``rich.live.Live``. Rich redraws it by erasing its own line(s) and
writing what was printed above it, so text printed while it is live must end where a terminal row
ends: either after a newline, or after exactly a row's worth of cells, where the terminal leaves the
cursor at the end of the row and wraps to the next one only when something more is written. The
answer is therefore handed to rich in whole rows (``committable``) and every character is written
once; the last partial row is written when the status line has gone.
"""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich import filesize
from rich.cells import get_character_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

TAB = "    "


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def for_display(text: str) -> str:
    """The answer as a terminal should show it: a tab as four spaces (a chunk does not know its
    column), and other control characters but newlines shown as ``\\xNN`` instead of being obeyed
    (a model's output must not move the cursor, clear the screen or retitle the window)."""
    if not any(unicodedata.category(ch) == "Cc" and ch != "\n" for ch in text):
        return text
    return "".join(
        ch if ch == "\n" or unicodedata.category(ch) != "Cc" else TAB if ch == "\t" else f"\\x{ord(ch):02x}"
        for ch in text
    )


def committable(pending: str, width: int) -> int:
    """How much of ``pending`` (written from column 0 of a row) ends where a terminal row ends: just
    after its last newline, or further, just after the last character that fills a row of ``width``
    cells exactly (the cursor then waits at the row's end, and the next thing written, the status
    line, starts the next row). A row end followed by a zero-width character is not one (the mark
    belongs to the character before it), nor is one not yet followed by anything (a zero-width mark
    may still come); past a wide character that does not fit a row's end (terminals wrap it
    differently) only the newline counts. Expects text from ``for_display`` (no control characters)."""
    if width <= 0:
        return pending.rfind("\n") + 1
    cut = pending.rfind("\n") + 1
    column = 0
    best = cut
    for index in range(cut, len(pending)):
        cells = get_character_cell_size(pending[index])
        if column + cells > width:
            break  # a wide character at a row's end: terminals differ there, so wait for the newline
        column += cells
        if column == width:
            if index + 1 < len(pending) and get_character_cell_size(pending[index + 1]) > 0:
                best = index + 1
            column = 0
    return best


@dataclass
class Pricing:
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass
class JobMeter:
    """What the status line says about a generating job: the server's token count, tokens per second
    since the first token, and the cost so far (estimated from the model's prices until the job ends,
    as the server prices a job only then)."""

    job_id: str
    pricing: Pricing
    input_tokens: int
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    tokens: int = 0
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self.started = self.clock()

    def saw_tokens(self, tokens: int | None) -> None:
        if tokens is None:
            return
        if tokens > 0 and self.first_token_at is None:
            self.first_token_at = self.clock()
        self.tokens = max(self.tokens, tokens)

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.clock()

    @property
    def cost_usd(self) -> float:
        return (
            self.input_tokens * self.pricing.input_per_mtok + self.tokens * self.pricing.output_per_mtok
        ) / 1e6

    @property
    def rate(self) -> float | None:
        if self.first_token_at is None:
            return None
        elapsed = self.clock() - self.first_token_at
        return self.tokens / elapsed if elapsed > 0.2 else None

    def describe(self) -> str:
        elapsed = self.clock() - self.started
        if self.first_token_at is None:
            return f"waiting for the first token · {elapsed:.1f} s · {self.job_id}"
        rate = self.rate
        speed = f"{rate:,.0f} tok/s" if rate is not None else "… tok/s"
        return f"{self.tokens:,} tokens · {speed} · ~${self.cost_usd:.6f} · {elapsed:.1f} s · {self.job_id}"


class StatusLine:
    """The status line's renderable: a spinner and the meter, redrawn at each refresh."""

    def __init__(self, meter: JobMeter) -> None:
        self.meter = meter
        self._spinner = Spinner("dots", style="cyan")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        frame = self._spinner.render(console.get_time())
        line = Text.assemble(
            frame if isinstance(frame, Text) else Text(str(frame)),
            " ",
            (self.meter.describe(), "dim"),
            no_wrap=True,
            overflow="ellipsis",
        )
        line.truncate(max(1, options.max_width - 1), overflow="ellipsis")
        yield line


class AnswerWriter:
    """Writes a streamed answer to ``out`` exactly once. On a terminal, a transient status line stays
    below the text while it streams (rich redraws it; the text goes through the same console, in
    whole rows, so rich always knows where the cursor is). Not on a terminal: the bare text, flushed
    as it comes, and no status line at all."""

    def __init__(self, out: TextIO, meter: JobMeter, *, console: Console | None = None) -> None:
        self._out = out
        self.meter = meter
        self.live = is_terminal(out)
        self._console = console or Console(file=out, highlight=False, emoji=False, markup=False)
        self._pending = ""
        self._wrote_any = False
        self._ended_with_newline = True
        self._live: Live | None = None

    def __enter__(self) -> AnswerWriter:
        self.start()
        return self

    def start(self) -> None:
        """Show the status line (on a terminal; once)."""
        if self.live and self._live is None:
            self._live = Live(
                StatusLine(self.meter),
                console=self._console,
                transient=True,
                refresh_per_second=8,
                redirect_stdout=False,
                redirect_stderr=True,  # a stray line on stderr is printed above the status line
            )
            # Drawn once now, before any text: rich erases a status line before it prints above it,
            # but decides how outside its lock, so a first drawing by its refresh thread at that
            # moment would have the first row of the answer written after it on the same row.
            self._live.start(refresh=True)

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def write(self, text: str) -> None:
        if not text:
            return
        self.meter.saw_text()
        self._wrote_any = True
        self._ended_with_newline = text.endswith("\n")
        if not self.live:
            self._out.write(text)
            self._out.flush()
            return
        self._pending += for_display(text)
        cut = committable(self._pending, self._console.width)
        if cut:
            self._emit(self._pending[:cut])
            self._pending = self._pending[cut:]

    def refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def pause(self) -> None:
        """Remove the status line and show the text so far, so that messages can follow it; ``write``
        goes on after them (on a terminal on a new row, piped exactly where the text stopped, so the
        text piped stays the answer's own)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._pending:
            self._emit(self._pending)
            self._pending = ""
        if self.live and self._wrote_any and not self._ended_with_newline:
            self._emit("\n")
            self._ended_with_newline = True

    def finish(self) -> None:
        """Remove the status line, write the last partial row, and end the answer's line."""
        if self._live is not None:
            self._live.stop()  # transient: the status line is erased, the cursor is where it began
            self._live = None
        if self._pending:
            self._emit(self._pending)
            self._pending = ""
        if self._wrote_any and not self._ended_with_newline:
            self._emit("\n")
            self._ended_with_newline = True

    def _emit(self, text: str) -> None:
        if self.live:
            self._console.print(Text(text), end="", soft_wrap=True)
        else:
            self._out.write(text)
            self._out.flush()


# ---------------------------------------------------------------------------------------- uploads
STAGES = {
    "read": ("reading files", "files"),
    "tokens": ("counting tokens", "files"),
    "upload": ("uploading", "bytes"),
}


class AmountColumn(ProgressColumn):
    """``3/12 files``, or ``7.5/20.0 MB 41.2 MB/s`` for bytes."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        total = int(task.total) if task.total is not None else None
        done = int(task.completed)
        if unit == "bytes":
            amount = f"{filesize.decimal(done)}" + (f" / {filesize.decimal(total)}" if total else "")
            speed = task.finished_speed or task.speed
            return Text(amount + (f"  {filesize.decimal(int(speed))}/s" if speed else ""))
        return Text(f"{done:,}" + (f"/{total:,}" if total else "") + f" {unit}")


class SyncProgress:
    """A progress bar per stage of a directory sync (files read, tokens counted, bytes uploaded), on
    ``console`` when it is a terminal; nothing otherwise. Call it as the client's ``progress``."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self.stages_seen: list[str] = []

    def __enter__(self) -> SyncProgress:
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description:<15}"),
                BarColumn(),
                AmountColumn(),
                TimeElapsedColumn(),
                console=self._console,
                refresh_per_second=10,
                transient=True,  # the line after it says what was uploaded
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.stages_seen:
            self.stages_seen.append(stage)
        if self._progress is None:
            return
        if stage not in self._tasks:
            description, unit = STAGES.get(stage, (stage, ""))
            self._tasks[stage] = self._progress.add_task(description, total=total or None, unit=unit)
        self._progress.update(self._tasks[stage], completed=done, total=total or None)


def skipped_note(skipped: Sequence[dict[str, str]], shown: int = 5) -> str | None:
    """``skipped 3 files: a.png (binary), big.json (too large), ...``"""
    if not skipped:
        return None
    names = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    noun = "file" if len(skipped) == 1 else "files"
    return f"skipped {len(skipped)} {noun}: {names}{more}"


# ----------------------------------------------------------------------------------------- tables
def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    numbers: Collection[str] = (),
    width: int | None = None,
    keep: Collection[str] = (),
    drop: Sequence[str] = (),
) -> Table:
    """A plain rich table (no box, a bold header); the columns named in ``numbers`` align right.
    Within ``width`` (a terminal's), the columns in ``drop`` are left out in that order until the
    rows fit, and those in ``keep`` (ids a reader copies into the next command) are never cut."""
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    shown = list(columns)
    natural = {name: max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)}
    if width is not None:
        for name in drop:
            if sum(natural[c] for c in shown) + 2 * (len(shown) - 1) <= width:
                break
            shown.remove(name)
    grid = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for name in shown:
        grid.add_column(
            name,
            justify="right" if name in numbers else "left",
            no_wrap=True,
            min_width=natural[name] if name in keep else None,
        )
    index = [columns.index(name) for name in shown]
    for row in cells:
        grid.add_row(*(row[i] for i in index))
    return grid


def output_console(stream: TextIO | None = None) -> Console:
    """A console for tables and lines on stdout (or ``stream``): a terminal's own width, or a wide
    one when piped, so a row is never wrapped into two."""
    stream = stream or sys.stdout
    terminal = is_terminal(stream)
    return Console(
        file=stream,
        width=None if terminal else 1000,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=not terminal,
    )


def message_console(stream: TextIO | None = None) -> Console:
    """A console for messages on stderr: styled on a terminal, plain otherwise, never wrapped."""
    return Console(file=stream or sys.stderr, highlight=False, emoji=False, markup=False, soft_wrap=True)
