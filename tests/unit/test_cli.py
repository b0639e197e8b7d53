"""The CLI without a stack: what it draws on a terminal (read back through a terminal emulator), how
each ending of a job is reported with its cost, one-line errors, the help, and the tables."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from spool import cli
from spool.admin import AdminError, AdminTarget, aws_errors
from spool.client import (
    ConnectionFailed,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NotFound,
    SyncError,
    Unauthorized,
)
from spool.terminal import (
    AnswerWriter,
    JobMeter,
    Pricing,
    SyncProgress,
    committable,
    for_display,
    skipped_note,
    table,
)
from tests.support import ROOT
from tests.terminal import answer_in, screen_of

ANSWER = (
    "The worker takes a job from the queue, leases it, and streams the provider's tokens into the"
    " chunk log, one flush at a time.\n\nA crash leaves the lease to expire; the next attempt resumes"
    " after the last chunk written, so nothing is lost or repeated.\n\nCancelling stops it within one"
    " flush interval, and the partial output stays readable. 終わり。"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    """What a terminal would receive (``isatty`` says yes)."""

    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------------------------- terminal
def test_text_is_handed_over_only_where_a_terminal_row_ends() -> None:
    assert committable("abcdefghij", 10) == 0  # a full row, but nothing after it yet
    assert committable("abcdefghijk", 10) == 10
    assert committable("abcdefghijklmnopqrstuv", 10) == 20
    assert committable("ab\ncd", 10) == 3  # through the newline
    assert committable("ab\ncdefghijklmnop", 10) == 13
    assert committable("abcdefghij\u0301x", 10) == 0  # a combining mark belongs to the row's last letter
    assert committable("abcdefghi終x", 10) == 0  # a wide character at the row's end: wait for a newline
    assert committable("abcdefgh終x", 10) == 9  # it fits exactly (9 characters, 10 cells)
    assert committable("abc", 0) == 0  # no width known: newlines only
    assert committable("abc\nd", 0) == 4


def test_control_characters_are_shown_not_obeyed() -> None:
    assert for_display("plain\ntext") == "plain\ntext"
    assert for_display("a\tb\x1b[2Jc\r") == "a    b\\x1b[2Jc\\x0d"


@pytest.mark.parametrize("columns", [23, 40, 80])
def test_the_answer_is_written_once_and_the_status_line_never_lands_in_it(columns: int) -> None:
    tty = Tty()
    clock = Clock()
    console = Console(file=tty, force_terminal=True, width=columns, color_system=None, markup=False)
    meter = JobMeter("job_test", Pricing(1.0, 2.0), 50, clock=clock)
    with AnswerWriter(tty, meter, console=console) as writer:
        for start in range(0, len(ANSWER), 7):
            clock.now += 0.1
            meter.saw_tokens(start // 4)
            writer.write(ANSWER[start : start + 7])
            writer.refresh()  # a redraw of the status line between every two pieces
    written = tty.getvalue().replace("\n", "\r\n")  # as a terminal's output processing does
    assert "tok/s" in written  # the status line was drawn
    plain = [line for line in screen_of(written, columns, 60) if line]
    assert not any("tok/s" in line or "job_test" in line for line in plain)  # and it is gone
    assert "".join("".join(plain).split()) == "".join(ANSWER.split())  # nothing mixed into the text
    # In the byte stream, once the status line's redraws are taken out, the answer is there once,
    # whole: the status line was only ever drawn between two rows of it.
    assert answer_in(written) == ANSWER + "\n"


def test_the_first_row_is_not_written_onto_a_status_line_drawn_at_that_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rich's refresh thread draws the status line while another thread prints: rich works out how
    to erase the status line before it renders the printed text, outside its lock. A status line
    that had never been drawn needs no erasing; if the refresh thread draws it for the first time
    in between, the first row of the answer was written after it on the same row (CI saw the
    first 80 columns of an answer lost that way). Forced here: the first redraw runs exactly then."""
    from rich.live import Live

    tty = Tty()
    console = Console(file=tty, force_terminal=True, width=40, color_system=None, markup=False)
    meter = JobMeter("job_test", Pricing(1.0, 2.0), 50, clock=Clock())
    process = Live.process_renderables
    raced: list[bool] = []

    def refreshed_in_between(live: Live, renderables: list[Any]) -> list[Any]:
        processed = process(live, renderables)
        if not raced and any(isinstance(each, Text) for each in renderables):  # a print, not a redraw
            raced.append(True)
            other = threading.Thread(target=live.refresh)
            other.start()
            other.join()
        return processed

    monkeypatch.setattr(Live, "process_renderables", refreshed_in_between)
    row = "The worker takes a job from the queue, "  # 39 cells, and the next one fills the row
    with AnswerWriter(tty, meter, console=console) as writer:
        writer.write(row + "l")
        writer.write("eases it.")
    assert raced
    written = tty.getvalue().replace("\n", "\r\n")
    plain = [line for line in screen_of(written, 40, 10) if line]
    assert plain == [row + "l", "eases it."]
    assert answer_in(written) == row + "leases it.\n"


def test_without_a_terminal_the_answer_is_the_bare_text() -> None:
    out = io.StringIO()
    meter = JobMeter("job_test", Pricing(), 0)
    with AnswerWriter(out, meter) as writer:
        writer.write("hello ")
        writer.write("world")
    assert out.getvalue() == "hello world\n"
    assert not writer.live


def test_the_meter_counts_the_servers_tokens_and_prices_them() -> None:
    clock = Clock()
    meter = JobMeter("job_x", Pricing(input_per_mtok=1.0, output_per_mtok=2.0), 1_000, clock=clock)
    assert "waiting for the first token" in meter.describe()
    meter.saw_tokens(0)
    assert meter.rate is None
    clock.now += 1
    meter.saw_text()
    clock.now += 2
    meter.saw_tokens(100)
    meter.saw_tokens(None)
    meter.saw_tokens(90)  # a late, older count never goes back
    assert meter.tokens == 100
    assert meter.rate == pytest.approx(50)
    assert meter.cost_usd == pytest.approx((1_000 * 1.0 + 100 * 2.0) / 1e6)
    assert meter.describe().startswith("100 tokens · 50 tok/s · ~$0.001200")


def test_sync_progress_draws_only_on_a_terminal() -> None:
    quiet = Console(file=io.StringIO())
    with SyncProgress(quiet) as progress:
        progress("read", 1, 2)
        progress("upload", 10, 20)
    assert progress.stages_seen == ["read", "upload"]
    assert quiet.file.getvalue() == ""  # type: ignore[attr-defined]
    tty = Tty()
    loud = Console(file=tty, force_terminal=True, width=100, color_system=None)
    with SyncProgress(loud) as progress:
        progress("read", 2, 2)
        progress("upload", 7_500_000, 20_000_000)
        progress("upload", 20_000_000, 20_000_000)
    drawn = tty.getvalue()
    assert "uploading" in drawn
    assert "20.0 MB" in drawn
    assert "━" in drawn


def test_skipped_files_are_named_with_their_reason() -> None:
    assert skipped_note([]) is None
    assert skipped_note([{"path": "a.png", "reason": "binary"}]) == "skipped 1 file: a.png (binary)"
    many = [{"path": f"f{i}.bin", "reason": "binary"} for i in range(7)]
    assert skipped_note(many) == (
        "skipped 7 files: f0.bin (binary), f1.bin (binary), f2.bin (binary), f3.bin (binary),"
        " f4.bin (binary) and 2 more"
    )


# ---------------------------------------------------------------------------------------- a fake
class FakeStream:
    def __init__(self, client: FakeClient, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
        self._client = client
        self._on_progress = on_progress
        self.result: dict[str, Any] | None = None
        self.closed = False
        self.last_sequence_id = 0

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(self._client.texts, start=1):
            if self._client.interrupt_at == index:
                raise KeyboardInterrupt
            if self._client.lost_at == index:  # the stack stopped under the stream
                raise ConnectionFailed("http://127.0.0.1:8000", "connection refused")
            self.last_sequence_id = index
            if self._on_progress:
                self._on_progress({"sequence_id": index, "tokens_generated": None, "chunks": index})
            if self._client.interrupt_after_taking == index:  # Ctrl-C while the status line polls
                raise KeyboardInterrupt
            yield text
        ending = self._client.ending
        result = {
            "job_id": "job_fake",
            "status": ending,
            "usage": {"estimated_tokens": 60, "input_tokens": 10, "output_tokens": 42},
            "cost_usd": 0.000123,
            "error": None,
        }
        if ending == "failed":
            result["error"] = {
                "code": "provider_error",
                "message": "simulated permanent failure at token 20",
                "details": {"last_sequence_id": 3},
                "suggestions": ["Try another model"],
            }
            raise JobFailed(result, len(self._client.texts))
        if ending == "cancelled":
            raise JobCancelled(result, len(self._client.texts))
        self.result = result
        self._client.finished = True

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """The client's interface, as the CLI uses it, with canned answers."""

    def __init__(
        self,
        ending: str = "completed",
        interrupt_at: int | None = None,
        interrupt_after_taking: int | None = None,
    ) -> None:
        self.texts = ["The answer ", "comes in ", "pieces."]
        self.ending = ending
        self.lost_at: int | None = None
        self.interrupt_at = interrupt_at
        self.interrupt_after_taking = interrupt_after_taking
        self.cancelled: list[str] = []
        self.polls = 0
        self.job_status = "running"
        self.finished = False

    def stream(
        self, job_id: str, after: int = 0, *, transport: str = "sse", on_progress: Any = None
    ) -> FakeStream:
        return FakeStream(self, on_progress)

    def job(self, job_id: str, *, output: bool = True) -> dict[str, Any]:
        self.polls += 1
        if self.finished:
            return {
                "job_id": job_id,
                "status": "completed",
                "progress": {"tokens_generated": 42, "last_sequence_id": 3, "chunks_written": 3},
                "usage": {"estimated_tokens": 60, "input_tokens": 10, "output_tokens": 42},
                "cost_usd": 0.000123,
                "first_token_at": "2026-11-27T07:00:00.500Z",
                "completed_at": "2026-11-27T07:00:01.500Z",
            }
        if self.cancelled and self.polls > 2:
            self.job_status = "cancelled"
        return {
            "job_id": job_id,
            "status": self.job_status,
            "progress": {"tokens_generated": 17, "last_sequence_id": 2, "chunks_written": 2},
            "usage": {"estimated_tokens": 60, "input_tokens": 10, "output_tokens": 17},
            "cost_usd": 0.000044,
        }

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.cancelled.append(job_id)
        return self.job(job_id)

    def create_job(self, message: str, **fields: Any) -> dict[str, Any]:
        self.created = {"message": message, **fields}
        return {
            "job_id": "job_fake",
            "model": {"requested": "default", "resolved": "sim-fast"},
            "usage": {"estimated_tokens": 1034},
        }

    def models(self) -> dict[str, Any]:
        return {
            "data": [
                {
                    "id": "sim-fast",
                    "aliases": ["default", "sim"],
                    "context_window": 128000,
                    "max_output_tokens": 65536,
                    "pricing": {"input_per_mtok": 0.1, "output_per_mtok": 0.4},
                    "fallbacks": [],
                    "status": "available",
                },
                {
                    "id": "sim-realtime",
                    "aliases": ["sim-chat"],
                    "context_window": 128000,
                    "max_output_tokens": 65536,
                    "pricing": {"input_per_mtok": 0.5, "output_per_mtok": 1.5},
                    "fallbacks": ["sim-fast"],
                    "status": "available",
                },
            ]
        }

    def usage(self, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        self.usage_asked = (since, until)
        return {
            "since": since or "2026-11-21",
            "until": until or "2026-11-27",
            "days": [
                {"date": "2026-11-27", "model": "sim-fast", "jobs": 3, "input_tokens": 24,
                 "output_tokens": 1200, "cost_usd": 0.00048},
            ],
            "by_model": {},
            "totals": {"jobs": 3, "input_tokens": 24, "output_tokens": 1200, "cost_usd": 0.00048},
            "limits": {
                "tokens_per_minute": {"limit": 200000, "remaining": 199000, "reset_seconds": 12},
                "tokens_per_day": {"limit": 10000000, "remaining": 9998800, "reset_seconds": 0},
                "concurrent_jobs": {"limit": 16, "running": 1},
                "daily_budget": {"limit_usd": 5.0, "committed_usd": 0.5,
                                 "reset_at": "2026-11-28T00:00:00.000Z"},
            },
        }  # fmt: skip

    def health(self, deep: bool = False) -> dict[str, Any]:
        return {
            "status": "degraded" if deep else "ok",
            "checked_at": "2026-11-27T07:00:00.000Z",
            "checks": {
                "dynamodb": {"status": "ok", "latency_ms": 12.5, "tables": 6},
                "queue": {"status": "ok", "latency_ms": 3.0, "depth": 0, "oldest_message_age_seconds": None},
                "provider:simulated": {
                    "status": "degraded" if deep else "ok",
                    "latency_ms": 40.0,
                    "models": {"sim-fast": {"circuit": "closed"}},
                    **({"error": "slow"} if deep else {}),
                    **(
                        {
                            "deep": {
                                "status": "down",
                                "model": "sim-fast",
                                "error": "provider_timeout",
                                "checked_at": "2026-11-27T06:59:30.000Z",
                                "cached": True,
                            }
                        }
                        if deep
                        else {}
                    ),
                },
            },
        }

    def _jobs(self) -> list[dict[str, Any]]:
        return [
            {
                "job_id": f"job_{n}",
                "status": "completed",
                "model": {"resolved": "sim-fast"},
                "usage": {"input_tokens": 10, "output_tokens": 5 * n},
                "progress": {"tokens_generated": 5 * n},
                "cost_usd": 0.000002 * n,
                "created_at": f"2026-11-27T07:00:0{n}.000Z",
            }
            for n in range(3)
        ]

    def list_jobs(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        return {"data": self._jobs()[:limit], "next_cursor": "c1" if limit < 3 else None}

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        return iter(self._jobs())

    def _contexts(self) -> list[dict[str, Any]]:
        return [
            {
                "context_id": "ctx_one",
                "version": 2,
                "file_count": 3,
                "token_count": 1234,
                "size_bytes": 2_500_000,
                "created_at": "2026-11-27T06:00:00.000Z",
                "updated_at": "2026-11-27T06:30:00.000Z",
                "expires_at": "2026-11-27T07:30:00.000Z",
            },
            {
                "context_id": "ctx_two",
                "version": 1,
                "file_count": 1,
                "token_count": 5,
                "size_bytes": 20,
                "created_at": "2026-11-27T06:00:00.000Z",
                "expires_at": "2999-01-01T00:00:00.000Z",
            },
        ]

    def list_contexts(self, *, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        return {"data": self._contexts(), "next_cursor": None}

    def iter_contexts(self, *, page_size: int = 50) -> Iterator[dict[str, Any]]:
        return iter(self._contexts())

    def sync_directory(
        self, directory: str, *, ttl_seconds: int = 3600, progress: Any = None
    ) -> dict[str, Any]:
        if directory == "missing":
            raise SyncError("missing: no such directory")
        if progress:
            progress("read", 1, 1)
            progress("upload", 100, 100)
        if directory == "interrupted":  # Ctrl-C while the server answers the upload
            raise KeyboardInterrupt
        return {
            "context_id": "ctx_one",
            "version": 1 if directory == "fresh" else 2,
            "file_count": 1,
            "token_count": 4,
            "skipped": [{"path": "logo.png", "reason": "binary"}],
            "changed": directory == "fresh",
            "uploaded_via": "direct" if directory == "fresh" else "none",
        }

    def patch_context(self, context_id: str, **changes: Any) -> dict[str, Any]:
        self.patched = [*getattr(self, "patched", []), (context_id, changes)]
        return {"context_id": context_id, "version": 3, "expires_at": "2026-12-15T00:00:00.000Z"}

    def get_context(self, context_id: str) -> dict[str, Any]:
        error = {
            "code": "context_not_found",
            "message": f"Context {context_id} not found",
            "request_id": "r-1",
        }
        if context_id == "ctx_elsewhere":  # not Spool answering: no envelope, its own request id header
            raise NotFound(404, None, {"X-Request-Id": "r-2"})
        raise NotFound(404, {"error": {**error, "suggestions": ["List yours with spool contexts list"]}})

    def delete_context(self, context_id: str) -> None:
        pass

    def stream_chunks(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The log after ``after``: all of ``texts`` was written (a cancelled job's up to its stop);
        past them, one more chunk ``x`` (what ``spool jobs chunks`` is shown printing)."""
        rest = [{"sequence_id": i, "text": t} for i, t in enumerate(self.texts, start=1) if i > after]
        return iter(rest or [{"sequence_id": after + 1, "text": "x"}])


def session(client: FakeClient) -> tuple[cli.AskSession, io.StringIO]:
    said = io.StringIO()
    clock = Clock()
    meter = JobMeter("job_fake", Pricing(0.1, 0.4), 10, clock=clock)
    say = Console(file=said, width=200, color_system=None)
    ask = cli.AskSession(client, "job_fake", meter, say, clock=clock, sleep=lambda _: None)  # type: ignore[arg-type]
    return ask, said


def test_a_completed_answer_ends_with_its_tokens_and_cost() -> None:
    ask, said = session(FakeClient())
    out = io.StringIO()
    assert ask.run(out) == 0
    assert out.getvalue() == "The answer comes in pieces.\n"
    assert said.getvalue().startswith(
        "completed: 10 tokens in, 42 out (0.0 s, 42 tok/s)"
    )  # the server's times
    assert "$0.000123" in said.getvalue()


def test_a_failed_job_ends_with_its_error_suggestion_and_cost() -> None:
    ask, said = session(FakeClient("failed"))
    out = io.StringIO()
    assert ask.run(out) == 1
    assert out.getvalue() == "The answer comes in pieces.\n"  # what was written before it failed
    lines = said.getvalue().splitlines()
    assert lines[0] == "failed: provider_error: simulated permanent failure at token 20"
    assert lines[1] == "  - Try another model"
    assert "10 tokens in, 42 out, $0.000123 (the partial answer above ends at chunk 3)" in lines[2]


def test_a_stream_lost_with_the_stack_says_the_job_goes_on_and_how_to_read_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It said only "Is the stack running?": nothing about the job, which carries on."""
    client = FakeClient()
    client.lost_at = 3
    ask, _ = session(client)
    out = io.StringIO()
    with pytest.raises(ConnectionFailed) as lost:
        ask.run(out)
    assert out.getvalue() == "The answer comes in \n"
    assert lost.value.suggestions[0] == (
        "Job job_fake goes on: read the rest with 'spool jobs chunks job_fake --after 2'"
        " once the stack answers"
    )
    assert any("make dev" in s for s in lost.value.suggestions)
    assert client.cancelled == []


def test_a_job_cancelled_elsewhere_says_so_with_its_cost() -> None:
    ask, said = session(FakeClient("cancelled"))
    assert ask.run(io.StringIO()) == 1
    assert said.getvalue().startswith(
        "cancelled: the job was cancelled elsewhere; 10 tokens in, 42 out, $0.000123"
    )


def test_ctrl_c_cancels_the_job_and_shows_what_it_cost() -> None:
    client = FakeClient(interrupt_at=3)
    ask, said = session(client)
    out = io.StringIO()
    assert ask.run(out) == 130
    assert client.cancelled == ["job_fake"]
    # The text up to the interrupt, then what the worker wrote until it stopped: the partial answer
    # the job keeps, whole (the chunk written after the interrupt was never printed).
    assert out.getvalue() == "The answer comes in pieces.\n"
    assert "cancelled: stopped after 17 tokens; 10 tokens in, 17 out, $0.000044" in said.getvalue()


def test_ctrl_c_whose_cancel_cannot_get_through_says_the_job_may_still_run() -> None:
    """With the stack down, Ctrl-C printed ``cancelling`` then ``Could not reach Spool`` and exited 2;
    the job ran on to its end, billed, and nothing had said it was not cancelled."""
    from spool.errors import ConnectionFailed

    client = FakeClient(interrupt_at=3)

    def unreachable(job_id: str) -> dict[str, Any]:
        raise ConnectionFailed("http://127.0.0.1:9", "Connection refused")

    client.cancel = unreachable  # type: ignore[method-assign]
    ask, said = session(client)
    assert ask.run(io.StringIO()) == 130
    shown = said.getvalue()
    assert "not cancelled: connection_failed" in shown
    assert "job_fake may still run and be billed — cancel it with spool jobs cancel job_fake" in shown


def test_ctrl_c_as_the_status_line_appears_cancels_the_job_and_removes_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C while rich started the status line (drawn at once since it may not race the first
    row) went past the cancel: the job ran on, billed, and the status line and a hidden cursor stayed
    on the terminal (an outside tester: 4 in 8 tries within ~3 ms of the line's first drawing)."""
    from rich.live import Live

    start = Live.start

    def interrupted_in_start(live: Live, refresh: bool = False) -> None:
        start(live, refresh)
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, its handler run here

    monkeypatch.setattr(Live, "start", interrupted_in_start)
    client = FakeClient()
    ask, said = session(client)
    tty = Tty()
    # Ctrl-C raises, as on a terminal: a run in the background (``make test &``) starts with it ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = ask.run(tty)
    except KeyboardInterrupt:  # not pytest's own: this test's Ctrl-C
        pytest.fail("the Ctrl-C went past the cancel")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert client.cancelled == ["job_fake"]
    assert "cancelled: stopped after" in said.getvalue()
    written = tty.getvalue().replace("\n", "\r\n")
    assert "\x1b[?25h" in written  # the cursor shown again
    assert not any("job_fake" in line for line in screen_of(written, 80, 24))  # no status line left
    assert answer_in(written) == "The answer comes in pieces.\n"  # what the job wrote until it stopped


class ClosedAfter(io.StringIO):
    """stdout piped into ``head -c N``: the reader goes away after ``n`` characters."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def write(self, text: str) -> int:
        if self.tell() >= self.n:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_ctrl_c_between_taking_a_chunk_and_printing_it_loses_nothing() -> None:
    """The stream counts a chunk as taken before its text reaches the writer, and the status line's
    poll runs in between: a Ctrl-C there dropped that chunk from the middle of the answer, the rest
    being read after it."""
    client = FakeClient(interrupt_after_taking=2)
    ask, _ = session(client)
    out = io.StringIO()
    assert ask.run(out) == 130
    assert out.getvalue() == "The answer comes in pieces.\n"


def test_a_reader_that_goes_away_cancels_the_job_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``spool ask ... | head -c 40`` ended with "error: unexpected BrokenPipeError ... report it",
    exit 2, and the job generating (and billed) to its end for nobody."""
    monkeypatch.setattr(cli, "_stdout_closed", lambda: None)  # the test's own stdout stays
    client = FakeClient()
    ask, said = session(client)
    assert ask.run(ClosedAfter(5)) == cli.EXIT_BROKEN_PIPE == 141
    assert client.cancelled == ["job_fake"]
    assert said.getvalue().startswith("output closed: cancelled job_fake")
    assert "error" not in said.getvalue()


class HungUpAfter(ClosedAfter):
    """A terminal that closed: every write fails with EIO (before SIGHUP's handler has run), until
    it is pointed at /dev/null."""

    devnull = False

    def write(self, text: str) -> int:
        if self.devnull:
            return len(text)
        if self.tell() >= self.n:
            raise OSError(errno.EIO, "Input/output error")
        return super().write(text)


def test_a_terminal_that_closes_under_the_answer_cancels_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to the closed terminal failed before SIGHUP's handler ran (the kernel sends both at
    once, and a loaded machine runs the write first): "unexpected OSError", exit 1, the job billed."""
    terminal = HungUpAfter(5)

    def to_devnull(streams: list[Any]) -> None:  # the test's own stdout and stderr stay
        assert terminal in streams
        terminal.devnull = True

    monkeypatch.setattr(cli, "_terminal_gone", to_devnull)
    client = FakeClient()
    ask, _ = session(client)
    assert ask.run(terminal) == cli.EXIT_INTERRUPTED
    assert client.cancelled == ["job_fake"] and terminal.devnull


def test_the_status_line_polls_the_server_at_most_once_a_second() -> None:
    client = FakeClient()
    client.texts = ["word "] * 10
    ask, _ = session(client)
    ask.run(io.StringIO())
    assert client.polls == 2  # ten chunks within the same (frozen) second: one poll, then the final view
    assert ask.meter.tokens == 42  # the final count


# ------------------------------------------------------------------------------------ the commands
@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(cli, "_client", lambda args, **options: client)
    return client


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_as_a_table_and_as_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    header, fast, realtime = out.splitlines()
    assert header.split()[:3] == ["MODEL", "ALIASES", "CONTEXT"]
    assert fast.split()[:5] == ["sim-fast", "default,", "sim", "128,000", "65,536"]
    assert "$0.5" in realtime and "sim-fast" in realtime.split()[-2:]
    code, out, _ = run(capsys, "models", "--json")
    assert [m["id"] for m in json.loads(out)] == ["sim-fast", "sim-realtime"]


def test_usage_shows_days_totals_and_limits(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "usage", "--since", "2026-11-20", "--until", "2026-11-27")
    assert code == 0
    assert fake.usage_asked == ("2026-11-20", "2026-11-27")
    assert "usage 2026-11-20 to 2026-11-27" in out
    assert any(line.split()[:3] == ["2026-11-27", "sim-fast", "3"] for line in out.splitlines())
    assert any(line.split()[:4] == ["total", "3", "24", "1,200"] for line in out.splitlines())
    assert "tokens per minute: 199,000 of 200,000 left, full again in 12 s" in out
    assert "concurrent jobs: 1 running of 16" in out
    assert "daily budget: $0.5000 committed, $5.0000" in out
    assert json.loads(run(capsys, "usage", "--json")[1])["totals"]["jobs"] == 3
    with pytest.raises(SystemExit):
        cli.main(["usage", "--since", "yesterday"])
    assert "not a day as YYYY-MM-DD" in capsys.readouterr().err


def test_health_exits_non_zero_unless_ok(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "health")
    assert code == 0
    assert out.startswith("ok (checked at 2026-11-27T07:00:00.000Z)")
    assert "tables=6" in out and "sim-fast: circuit closed" in out
    code, out, _ = run(capsys, "health", "--deep")
    assert code == 1
    assert "slow" in out
    # the deep probe as a sentence, not a raw mapping
    assert "probe of sim-fast down (provider_timeout, cached from 2026-11-27T06:59:30.000Z)" in out
    assert "{" not in out
    assert json.loads(run(capsys, "health", "--json")[1])["status"] == "ok"


def test_jobs_and_contexts_list(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "jobs", "list", "--limit", "2")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["JOB", "ID", "STATUS", "MODEL", "IN", "OUT", "COST", "CREATED"]
    assert [row.split()[0] for row in rows] == ["job_0", "job_1"]
    assert "--all lists every one" in err
    assert len(json.loads(run(capsys, "jobs", "list", "--all", "--json")[1])) == 3
    code, out, _ = run(capsys, "contexts", "list")
    assert out.splitlines()[1].split()[:5] == ["ctx_one", "2", "3", "1,234", "2.5"]
    # an expired context stays listed until its TTL deletes it: marked, as its uses answer 410
    assert out.splitlines()[1].rstrip().endswith("2026-11-27T07:30:00.000Z (expired)")
    assert out.splitlines()[2].rstrip().endswith("2999-01-01T00:00:00.000Z")
    assert json.loads(run(capsys, "contexts", "list", "--all", "--json")[1])[0]["context_id"] == "ctx_one"
    with pytest.raises(SystemExit):
        cli.main(["jobs", "list", "--limit", "500"])
    assert "must be 1 to 100" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage", "says"),
    [
        (["ask", "hi", "--bogus", "1"], "spool ask ", "unrecognized arguments: --bogus 1"),
        (["keys", "rotate", "k1", "--nope"], "spool keys rotate ", "unrecognized arguments: --nope"),
        (
            ["keys", "rotate", "k1", "--grace", "abc"],
            "spool keys rotate ",
            "not a whole number of seconds: 'abc'",
        ),
    ],
)
def test_a_bad_option_is_reported_with_its_commands_usage(
    argv: list[str], usage: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert usage in err.splitlines()[0] and says in err


def test_contexts_sync_reports_skipped_files_and_no_change(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "contexts", "sync", "fresh")
    assert (code, out) == (0, "ctx_one\n")
    assert "context ctx_one version 1: 1 files, 4 tokens, uploaded direct" in err
    assert "skipped 1 file: logo.png (binary)" in err
    code, out, err = run(capsys, "contexts", "sync", "again", "--json")
    assert json.loads(out)["changed"] is False
    assert "context ctx_one unchanged (version 2" in err
    assert not getattr(fake, "patched", [])  # an unchanged sync keeps the context's expiry
    # ...unless a --ttl was given: the expiry is renewed (it was ignored without a word)
    code, out, err = run(capsys, "contexts", "sync", "again", "--ttl", "604800")
    assert fake.patched == [("ctx_one", {"ttl_seconds": 604800})]
    assert "context ctx_one unchanged, its expiry renewed to 2026-12-15T00:00:00.000Z (version 3" in err
    code, _, err = run(capsys, "contexts", "sync", "missing")
    assert code == 2
    assert err == "error: missing: no such directory\n"
    # Ctrl-C once the upload was sent: a context may exist that the next sync does not know
    code, _, err = run(capsys, "contexts", "sync", "interrupted")
    assert code == 130 and "the server may have applied it" in err and "spool contexts list" in err


def test_an_empty_question_is_refused_before_a_job_is_made(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    for question in ("", "   "):
        with pytest.raises(SystemExit) as exited:
            cli.main(["ask", question])
        assert exited.value.code == 2 and "the question is empty" in capsys.readouterr().err
    assert not hasattr(fake, "created")  # no job was asked for


def test_ask_creates_the_job_with_its_options(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "ask", "why?", "--context", "fresh", "--model", "sim-fast", "--metadata", '{"team": "web"}'
    )
    assert code == 0
    assert out == "The answer comes in pieces.\n"
    assert fake.created["context_id"] == "ctx_one"
    assert fake.created["metadata"] == {"team": "web"}
    assert "job job_fake on sim-fast (for default)" in err
    with pytest.raises(SystemExit):
        cli.main(["ask", "x", "--metadata", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["models", "stream"])
def test_ctrl_c_once_the_job_exists_cancels_it_before_the_answer_streams(
    where: str, fake: FakeClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C just after ``job job_... on ...`` (while the prices were asked for) printed only
    ``interrupted`` and left the job running, billed."""
    monkeypatch.setattr(cli.time, "sleep", lambda _: None)  # the cancel's wait for the job to stop

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, where, interrupt)
    code, out, err = run(capsys, "ask", "why?")
    assert code == 130
    assert fake.cancelled == ["job_fake"]
    assert "cancelling job_fake" in err
    assert "cancelled: stopped after 17 tokens; 10 tokens in, 17 out, $0.000044 · job_fake" in err
    assert out == "The answer comes in pieces.\n"  # what the job wrote until it stopped


class StartInterrupted:
    """An ``EmbeddedStack`` whose start is stopped by a Ctrl-C, and a second one that lands at the
    ``nth`` line the first one's handler runs (a user pressing Ctrl-C twice)."""

    nth = 1

    def __init__(self, **options: Any) -> None:
        self.saved = None
        self.stops = 0
        self.nested = False
        StartInterrupted.last = self

    def start(self) -> None:
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        lines = 0

        def second_ctrl_c(frame: Any, event: str, arg: Any) -> Any:
            nonlocal lines
            if event == "line" and not self.nested:
                lines += 1
                if lines == self.nth:
                    self.nested = True
                    handler(signal.SIGINT, frame)
            return second_ctrl_c

        tracing = sys.gettrace()  # coverage's, given back
        sys.settrace(second_ctrl_c)
        try:
            handler(signal.SIGINT, None)
        except BaseException:
            self.stop()  # as the stack's start does: it stops what it began
            raise
        finally:
            sys.settrace(tracing)

    def stop(self, save: bool = True) -> None:
        self.stops += 1


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_inside_the_first_ones_handler_neither_hangs_nor_cuts_the_stop_short(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two Ctrl-Cs at once hung `spool dev` (once in ~19 starts): the second one's handler ran inside the
    first one's, which held a threading.Event's lock, and waited for it for ever."""
    from spool.devstack import stack

    monkeypatch.setattr(stack, "EmbeddedStack", StartInterrupted)
    original = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        nested_at = []
        for nth in range(1, 10):
            StartInterrupted.nth = nth
            assert cli.main(["dev", "--port", "0"]) == 130
            assert StartInterrupted.last.stops == 1
            assert "spool: stopped before it was ready" in capsys.readouterr().out
            if StartInterrupted.last.nested:
                nested_at.append(nth)
        assert nested_at[:2] == [1, 2]  # it did land inside the handler, at each of its lines
    finally:
        signal.signal(signal.SIGINT, original[0])
        signal.signal(signal.SIGTERM, original[1])


def exit_code_of(directory: Path, *args: str) -> int:
    """Python run with ``args`` in ``directory``, Spool importable: its exit code (-N: killed by N)."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode


INTERRUPTED_IN_EXEC = """
import sys
try:
    exec("raise KeyboardInterrupt", {})  # a Ctrl-C landing while a dataclass's methods are built
except KeyboardInterrupt:
    pass
if sys.argv[1] == "exit_with":
    from spool.__main__ import exit_with
    exit_with(130)
sys.exit(130)
"""


@pytest.mark.parametrize("how", ["exit_with", "sys.exit"])
def test_a_handled_ctrl_c_exits_130_under_python_m(how: str, tmp_path: Path) -> None:
    """``python -m spool`` (the end-to-end tests' way in) exited -2, killed by SIGINT, after a Ctrl-C
    it had handled: CPython 3.12 remembers a KeyboardInterrupt that ended a string ``exec`` even when
    it was caught, and ``-m`` obeys that at exit. ``sys.exit`` alone shows it (so this test would
    see the mark come back); ``exit_with`` clears it."""
    (tmp_path / "interrupted.py").write_text(INTERRUPTED_IN_EXEC)
    code = exit_code_of(tmp_path, "-m", "interrupted", how)
    assert code == (130 if how == "exit_with" else -signal.SIGINT)


CTRL_C_IN_TEARDOWN = """
import os, signal, sys

class PressedLate:
    def __del__(self):  # run as the interpreter clears its modules, its own handlers already gone
        os.kill(os.getpid(), signal.SIGINT)

signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal (not a background job's)
late = PressedLate()
if sys.argv[1] == "ignored":
    from spool.__main__ import ignore_ctrl_c_in_teardown
    ignore_ctrl_c_in_teardown()
sys.exit(130)
"""


@pytest.mark.parametrize("how", ["ignored", "default"])
def test_a_ctrl_c_in_the_interpreters_teardown_keeps_the_commands_exit_code(how: str, tmp_path: Path) -> None:
    """Three quick Ctrl-Cs in ``spool ask``: the second ended it (130), the third landed in the
    interpreter's teardown, where Python had put the default action back, and killed it (-2, 8 in 8
    tries). The script as pip installs it (a file, not ``-m``)."""
    (tmp_path / "late.py").write_text(CTRL_C_IN_TEARDOWN)
    assert exit_code_of(tmp_path, "late.py", how) == (130 if how == "ignored" else -signal.SIGINT)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("handler", ["default", "another"])
def test_sigterm_or_a_closed_terminal_cancels_the_job_as_ctrl_c_does(
    signum: int,
    handler: str,
    fake: FakeClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM, or SIGHUP as the terminal closed, ended ``spool ask`` at once (exit 143, 129) and left
    the job running and billed: Ctrl-C and a closed pipe cancelled it. Also under a handler of
    someone else's (coverage's, in CI, saves its data on SIGTERM and dies by it: exit -15)."""
    monkeypatch.setattr(cli.time, "sleep", lambda _: None)

    def anothers(signum: int, frame: Any) -> None:
        raise AssertionError("the handler of someone else's ran instead of the CLI's")

    initial: Any = signal.SIG_DFL if handler == "default" else anothers  # as a shell starts a program
    saved = signal.signal(signum, initial)

    class Signalled(FakeStream):
        def __iter__(self) -> Iterator[str]:
            for index, text in enumerate(self._client.texts, start=1):
                if index == 3:
                    # without a handler of the CLI's, the signal would end this test run itself
                    assert callable(signal.getsignal(signum)), "the signal would end spool ask as it is"
                    signal.raise_signal(signum)
                self.last_sequence_id = index
                yield text

    monkeypatch.setattr(fake, "stream", lambda *args, on_progress=None, **kw: Signalled(fake, on_progress))
    try:
        code, out, err = run(capsys, "ask", "why?")
        assert signal.getsignal(signum) == initial  # as it was before
    finally:
        signal.signal(signum, saved)
    assert code == 130
    assert fake.cancelled == ["job_fake"]
    assert "cancelled: stopped after 17 tokens; 10 tokens in, 17 out, $0.000044 · job_fake" in err
    assert out == "The answer comes in pieces.\n"


def test_other_job_and_context_commands(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads(run(capsys, "jobs", "get", "job_1", "--no-output")[1])["job_id"] == "job_1"
    cancelled = run(capsys, "jobs", "cancel", "job_1")[2]  # a running job: its cancel is on its way
    assert cancelled.startswith("job_1: cancel requested (running; its worker stops within a flush")
    assert json.loads(run(capsys, "jobs", "chunks", "job_1", "--after", "4")[1]) == {
        "sequence_id": 5,
        "text": "x",
    }
    assert run(capsys, "contexts", "delete", "ctx_one")[2] == "deleted ctx_one\n"
    code, _, err = run(capsys, "contexts", "get", "ctx_gone")
    assert code == 2
    assert err == (
        "error: context_not_found: Context ctx_gone not found (request r-1)"
        " — List yours with spool contexts list\n"
    )
    err = run(capsys, "contexts", "get", "ctx_elsewhere")[2]
    assert err.startswith(
        "error: http_error: HTTP 404 (request r-2) — Check that SPOOL_URL (or --url) is a Spool"
    )


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("url", ["ftp://x", "notaurl", "http://"])
def test_a_malformed_url_is_told_to_be_fixed_not_retried(url: str) -> None:
    error = ConnectionFailed(url, "Request URL is missing an 'http://' or 'https://' protocol.")
    assert error.suggestions == [
        "SPOOL_URL (or --url) must be an http:// or https:// URL with a host,"
        " such as http://127.0.0.1:8000 or your stack's ApiUrl output"
    ]
    reachable = ConnectionFailed("https://api.example.com", "[Errno 111] Connection refused")
    assert "Retry in a moment: the server may be restarting" in reachable.suggestions


def test_an_unreachable_stack_is_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(args: argparse.Namespace, **options: Any) -> Any:
        raise ConnectionFailed("http://127.0.0.1:8000", "[Errno 111] Connection refused")

    monkeypatch.setattr(cli, "_client", unreachable)
    code, out, err = run(capsys, "models")
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("error: Could not reach Spool at http://127.0.0.1:8000")
    assert "make dev" in err
    with pytest.raises(ConnectionFailed):
        cli.main(["--debug", "models"])
    with pytest.raises(ConnectionFailed):
        cli.main(["models", "--debug"])


def test_a_refused_key_or_a_doubled_v1_says_what_to_change_in_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 401 said only how to send the key as an HTTP header, never --key or SPOOL_API_KEY; a URL
    ending in /v1 (as OpenAI clients take it) answered "No route for GET /v1/v1/models" and pointed
    at /v1, which the URL already had."""
    from spool_core import errors

    refused = {
        "error": {
            "code": "unauthorized",
            "message": "Missing or invalid API key",
            "suggestions": list(errors.Unauthorized.default_suggestions),
            "request_id": "r-1",
        }
    }
    no_route = {
        "error": {
            "code": "not_found",
            "message": "No route for GET /v1/v1/models",
            "details": {"path": "/v1/v1/models"},
            "suggestions": list(errors.NotFound.default_suggestions),
        }
    }
    answer: dict[str, Any] = {}

    def failing(args: argparse.Namespace, **options: Any) -> Any:
        raise answer["error"]

    monkeypatch.setattr(cli, "_client", failing)
    monkeypatch.delenv("SPOOL_API_KEY", raising=False)
    answer["error"] = Unauthorized(401, refused)
    code, _, err = run(capsys, "models")
    assert code == 2
    assert err.startswith("error: unauthorized: Missing or invalid API key (request r-1) — ")
    assert "--key or SPOOL_API_KEY" in err and "make dev prints the dev key" in err
    assert "Authorization: Bearer" not in err  # the CLI sends the header itself
    assert "spool keys create --tenant" in err
    # a key was given: it is the key that is wrong, not its absence
    monkeypatch.setenv("SPOOL_API_KEY", "sk-typo")
    err = run(capsys, "models")[2]
    assert "The key given (--key or SPOOL_API_KEY) is not one this stack takes" in err
    assert "Give your API key" not in err
    monkeypatch.delenv("SPOOL_API_KEY")
    assert "The key given" in run(capsys, "models", "--key", "sk-typo")[2]
    answer["error"] = NotFound(404, no_route)
    err = run(capsys, "models")[2]
    assert "Drop the /v1 at the end of SPOOL_URL (or --url)" in err
    hint = "Use ?since=2026-11-01&until=2026-11-30 (UTC dates); ask for a year at a time"
    answer["error"] = InvalidRequest(400, {"error": {"code": "invalid_request", "suggestions": [hint]}})
    err = run(capsys, "usage")[2]  # the server's query string, as the CLI's options
    assert "Use --since 2026-11-01 --until 2026-11-30 (UTC dates)" in err and "?since=" not in err
    assert "the API lives under /v1" not in err


def test_an_unexpected_error_is_one_line_with_a_pointer_to_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace, **options: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_client", broken)
    code, _, err = run(capsys, "health")
    assert code == 2
    assert (
        err
        == "error: unexpected RuntimeError: boom — Run again with --debug for the traceback, and report it\n"
    )


def test_keys_without_aws_credentials_or_a_local_stack_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = run(capsys, "keys", "create", "--tenant", "t", "--stack-name", "spool-prod")
    assert code == 2
    assert err.splitlines() == [
        "error: admin_target: No AWS credentials or region to reach stack spool-prod — Configure them"
        " (aws configure, or AWS_PROFILE / AWS_REGION); For the local stack, omit --stack-name"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "--tenant", ""],
        ["keys", "list", "--tenant", ""],
        ["keys", "list", "--tenant", "a b"],
        ["keys", "revoke", "key_1", "--tenant", "a/b"],
        ["keys", "rotate", "key_1", "--tenant", "_x"],
        ["limits", "get", "--tenant", "a b"],
        ["limits", "set", "--tenant", "a" * 65, "--tokens-per-minute", "5"],
    ],
)
def test_a_malformed_tenant_is_a_usage_error_naming_the_rule(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tenant ''`` crashed as an unexpected AssertionError (keys create) or listed every tenant's
    keys (keys list); ``'a b'`` was an ``unexpected InvalidTenantId ... report it``."""

    def no_stack(*args: Any) -> Any:
        raise AssertionError("the command ran")

    monkeypatch.setattr(cli, "_admin_target", no_stack)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--tenant" in err and "must be 1-64 characters of letters, digits" in err
    assert "starting with a letter or digit" in err
    assert "unexpected" not in err


def test_aws_errors_become_one_admin_error() -> None:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
    )

    target = AdminTarget("stack s", {}, {})
    raised: list[BaseException] = [
        NoCredentialsError(),
        EndpointConnectionError(endpoint_url="http://x"),
        ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutItem"),
        ParamValidationError(report="bad"),
    ]
    messages = []
    for error in raised:
        with pytest.raises(AdminError) as caught, aws_errors(target):
            raise error
        messages.append(caught.value.message)
    assert messages[0] == "No AWS credentials or region to reach stack s"
    assert messages[1].startswith("stack s could not be reached")
    assert messages[2] == "AWS refused the change to stack s: AccessDeniedException: no"
    assert messages[3].startswith("AWS call to stack s failed")


# ------------------------------------------------------------------------------------------ help
def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help_and_no_help_shows_raw_backticks(capsys: pytest.CaptureFixture[str]) -> None:
    for parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # each of its commands has its own
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        assert "`" not in text, parser.prog
    ask = next(parser for parser in _parsers(cli.build_parser()) if parser.prog == "spool ask")
    assert "longest answer, in tokens (default: 1024)" in " ".join(ask.format_help().split())


CTRL_C_AS_IT_LOADS = """
import sys


class CtrlC:  # a Ctrl-C as the client's HTTP library loads
    def find_spec(self, name, path=None, target=None):
        if name == "httpx2":
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, CtrlC())
sys.argv = ["spool", "models"]
from {module} import {function} as main

sys.exit(main())
"""


def test_ctrl_c_while_the_command_loads_ends_it_quietly() -> None:
    """A Ctrl-C in the command's first few tenths of a second, while its libraries load, printed a
    KeyboardInterrupt traceback from inside an import."""
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["spool"]
    module, _, function = script.partition(":")  # what the installed ``spool`` runs
    code = CTRL_C_AS_IT_LOADS.format(module=module, function=function)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (done.returncode, done.stderr) == (cli.EXIT_INTERRUPTED, "")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"spool {cli._version()}"
    assert cli._version()[0].isdigit()


@pytest.mark.parametrize("width", [40, 80, 100, 200])
def test_a_listing_on_a_narrow_terminal_drops_columns_never_the_ids(width: int) -> None:
    """At 80 columns ``spool jobs list`` showed ``job_drsjunhzpp4djggfxi2ube…``: an id nobody could
    copy into ``spool jobs get``. The least useful columns go first; the ids stay whole."""
    ids = [f"job_{c * 26}" for c in "ab"]
    rows = [
        (i, "completed", "sim-realtime", "1,234", "5,678", "$0.001234", "2026-12-05T18:00:00.000Z")
        for i in ids
    ]
    columns = ["JOB ID", "STATUS", "MODEL", "IN", "OUT", "COST", "CREATED"]
    shown = io.StringIO()
    Console(file=shown, width=width, color_system=None).print(
        table(
            None, columns, rows, width=width, keep=("JOB ID",), drop=("CREATED", "MODEL", "IN", "COST", "OUT")
        )
    )
    lines = shown.getvalue().splitlines()
    assert all(job_id in text for job_id, text in zip(ids, lines[1:], strict=True))
    assert all(len(line) <= width for line in lines)
    natural = 30 + 9 + 12 + 5 + 5 + 9 + 24 + 2 * 6  # every column whole, two spaces between
    assert ("CREATED" in lines[0]) is (width >= natural) and "STATUS" in lines[0]
    assert ("MODEL" in lines[0]) is (width >= natural - 26)


def test_a_terminal_narrower_than_the_ids_still_shows_them_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 28 columns a job id lost its last characters: the row was cropped at the terminal's edge."""
    shown = io.StringIO()
    monkeypatch.setattr(cli, "output_console", lambda: Console(file=shown, width=28, color_system=None))
    ids = [f"job_{c * 26}" for c in "ab"]
    cli._print_listing(["JOB ID", "STATUS"], [(i, "completed") for i in ids], numbers=(), drop=())
    assert all(job_id in line for job_id, line in zip(ids, shown.getvalue().splitlines()[1:], strict=True))


@pytest.mark.parametrize("width", [40, 60, 100])
def test_usage_on_a_narrow_terminal_drops_columns_and_never_cuts_a_number(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """At 60 columns ``spool usage`` showed the day as ``2026-12-…`` and the cost as ``$0.0064…``, at
    40 the tokens as ``182,2…``: numbers that look real. Columns go whole instead, as in listings."""
    day = {"date": "2026-12-06", "model": "sim-realtime", "jobs": 1234, "input_tokens": 1822345,
           "output_tokens": 182234, "cost_usd": 0.00641234}  # fmt: skip
    usage = fake.usage()
    usage["days"] = [day]
    usage["totals"] = {k: day[k] for k in ("jobs", "input_tokens", "output_tokens", "cost_usd")}
    monkeypatch.setattr(fake, "usage", lambda since=None, until=None: usage)
    shown = io.StringIO()
    monkeypatch.setattr(cli, "output_console", lambda: Console(file=shown, width=width, color_system=None))
    assert run(capsys, "usage")[0] == 0
    lines = shown.getvalue().splitlines()
    assert "…" not in shown.getvalue()
    assert all(len(line) <= width for line in lines)
    header = lines.index(next(line for line in lines if line.startswith("DAY")))
    names = lines[header].split("  ")
    row, total = lines[header + 1].split(), lines[header + 2].split()
    assert row[0] == "2026-12-06" and row[-1] == "$0.006412"
    assert total[0] == "total" and total[-1] == "$0.006412"
    whole = {"1,234", "1,822,345", "182,234", "sim-realtime"}
    assert set(row[1:-1]) <= whole  # the columns shown between the day and the cost, whole
    assert ("JOBS" in names) is (width >= 100)


@pytest.mark.parametrize("width", [30, 50, 80])
def test_models_and_health_on_a_narrow_terminal_keep_their_names_and_statuses(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """At 60 columns ``spool health`` left STATUS out, at 80 it showed ``ST…``, and ``spool models``
    cut the model ids (``sim-f…``): the names and statuses stay whole, other columns go first."""
    shown = io.StringIO()
    monkeypatch.setattr(cli, "output_console", lambda: Console(file=shown, width=width, color_system=None))
    assert run(capsys, "models")[0] == 0
    models = shown.getvalue().splitlines()
    assert [line.split()[0] for line in models[1:]] == ["sim-fast", "sim-realtime"]
    assert all(len(line) <= width for line in models)
    shown.seek(0), shown.truncate()
    assert run(capsys, "health")[0] == 0
    lines = shown.getvalue().splitlines()
    rows = lines[[line.split()[:1] for line in lines].index(["CHECK"]) + 1 :]
    assert [line.split()[:2] for line in rows] == [
        ["dynamodb", "ok"],
        ["queue", "ok"],
        ["provider:simulated", "ok"],
    ]
