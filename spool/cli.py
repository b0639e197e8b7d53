"""spool: Spool's command line. Run the local stack, ask questions about a directory with the answer
streamed live, and look at models, usage, health, jobs, contexts, API keys and limits."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich_argparse import RichHelpFormatter

from spool._core import DEFAULT_KEY
from spool.client import (
    DEFAULT_URL,
    Client,
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    JobStream,
    SpoolError,
    SyncError,
    Unauthorized,
)
from spool.terminal import (
    AnswerWriter,
    JobMeter,
    Pricing,
    SyncProgress,
    is_terminal,
    message_console,
    output_console,
    skipped_note,
    table,
)

DEFAULT_TTL = 3600  # seconds a context lives when --ttl is not given
TTL_HELP = "seconds the context lives from an upload (default 3600); given, an unchanged one's expiry too"
EXIT_OK = 0
EXIT_BROKEN_PIPE = 141  # stdout's reader went away: as a program that SIGPIPE ends, quietly
EXIT_FAILED = 1  # the job failed or was cancelled elsewhere; a check said unhealthy
EXIT_ERROR = 2  # the request could not be made or was refused (and argparse's usage errors)
EXIT_INTERRUPTED = 130  # Ctrl-C


class CommandError(Exception):
    """A command cannot go on, for a reason the user can fix: one line and suggestions, no traceback."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.suggestions = suggestions or []


STOP_CHECK_SECONDS = 0.25  # how soon `spool dev` notices a stop signal at the latest


def _dev(args: argparse.Namespace) -> int:
    from spool.devstack.ports import PortInUse
    from spool.devstack.stack import EmbeddedStack
    from spool.devstack.state import StateUnusable
    from spool.devstack.template import parse_parameter_overrides

    stack = EmbeddedStack(
        port=args.port,
        ws_port=args.ws_port,
        host=args.host,
        config_env=args.config_env,
        parameter_overrides=parse_parameter_overrides(args.parameter_overrides),
        workers=args.workers,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    # A plain flag, not a threading.Event: a second signal can arrive while the handler of the first is
    # inside Event.set, holding the event's lock, and the nested call then waited for that lock for
    # ever (two Ctrl-Cs at once hung `spool dev` once in ~19 starts).
    stopped = False
    starting = True
    moto_exit: int | None = None  # moto's exit code, when it died under the stack

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal starting, stopped
        stopped = True
        if starting:
            starting = False  # once: a second signal must not cut short the stop (and its save)
            raise KeyboardInterrupt  # abandon the start; start() stops what it began

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("spool: starting the embedded stack (moto server, API Gateway emulator, worker)...", flush=True)
    try:
        stack.start()
    except (PortInUse, StateUnusable) as exc:
        print(f"spool: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        _ignore_stop_signals()
        _tell(_saved_line(stack))
        _tell("spool: stopped before it was ready")
        return 130
    starting = False
    try:
        state = f" (state kept in {stack.state_dir})" if stack.state_dir else ""
        print(f"spool: AWS endpoint (moto)  {stack.moto.url}", flush=True)
        print(f"spool: API base URL         {stack.base_url}{state}", flush=True)
        print(f"spool: WebSocket URL        {stack.websocket_url}", flush=True)
        print(f"spool: dev API key          {stack.api_key}", flush=True)
        print(f"spool: try  curl -s {stack.base_url}/v1/health", flush=True)
        # The CLI sends the default dev key unless told another: name the stack's when it differs.
        key = "" if stack.api_key == DEFAULT_KEY else f" SPOOL_API_KEY={stack.api_key}"
        print(
            f"spool: try  SPOOL_URL={stack.base_url}{key} {_spool_command()} ask 'What does the worker do?'"
            " --context ./worker",
            flush=True,
        )
        print(f"spool: ready on {stack.base_url} (Ctrl-C to stop)", flush=True)
        # Slept in short steps: a handler that is due runs when the main thread next wakes, and sets
        # the flag this loop looks at (the handler takes no lock, see ``stopped``).
        while not stopped and (moto_exit := stack.moto.exited()) is None:
            time.sleep(STOP_CHECK_SECONDS)
    finally:
        _tell("spool: stopping...")
        stack.stop(save=moto_exit is None)  # saves the state: nothing said before may keep it from happening
        _ignore_stop_signals()
        _tell(_saved_line(stack))
        _tell("spool: stopped")
    if moto_exit is not None:
        # Every table, object and queue lived in it: nothing can go on, and nothing can be saved.
        print(
            f"spool: the local AWS endpoint (moto, {stack.moto.url}) exited with code {moto_exit}; every"
            " request would fail, so the stack stopped. What it held since the last save is lost;"
            " start it again with make dev",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def _ignore_stop_signals() -> None:
    """Stopped and saved: a Ctrl-C pressed again (or a SIGTERM) while the process exits is ignored.
    Python puts the default action back on its own handlers as the interpreter finalizes, so such a
    signal would kill the stopped process (exit -2 instead of 130; see also ``exit_with``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _saved_line(stack: Any) -> str | None:
    saved = stack.saved
    if saved is None:
        return None
    return (
        f"spool: saved {saved['items']} items, {saved['objects']} objects and {saved['messages']}"
        f" queued messages to {stack.state_dir}"
    )


def _tell(line: str | None) -> None:
    """A line of the stack's own, said if anyone still reads it: Ctrl-C in `make dev | tee log` ends
    the tee too, and the stack must still stop and save its state."""
    if line is None:
        return
    try:
        print(line, flush=True)
    except (BrokenPipeError, ValueError):  # ValueError: stdout was closed after the last broken pipe
        _stdout_closed()


def _client(args: argparse.Namespace, **options: Any) -> Client:
    return Client(args.url, args.key, **options)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _money(usd: float | None) -> str:
    if usd is None:
        return "$?"
    return f"${usd:,.4f}" if usd >= 0.01 else f"${usd:.6f}"


# ------------------------------------------------------------------------------------------- ask
def _ask(args: argparse.Namespace) -> int:
    with _stops_as_ctrl_c():
        return _ask_job(args)


def _ask_job(args: argparse.Namespace) -> int:
    client = _client(args)
    say = message_console()
    context_id = None
    if args.context:
        context_id = _sync(client, args.context, args.ttl, say)["context_id"]
    job = client.create_job(
        args.question,
        context_id=context_id,
        model=args.model,
        max_tokens=args.max_tokens,
        metadata=args.metadata,
    )
    # From here on the job exists and is billed: a Ctrl-C at any point cancels it, as mid-answer (it
    # left the job running when it came during the prices' request, before the stream began).
    meter = JobMeter(job["job_id"], Pricing(), max(0, job["usage"]["estimated_tokens"] - args.max_tokens))
    session = AskSession(client, job["job_id"], meter, say, transport=args.transport)
    try:
        model = job["model"]
        fallback = f" (for {model['requested']})" if model["requested"] != model["resolved"] else ""
        say.print(f"job {job['job_id']} on {model['resolved']}{fallback}", style="dim")
        meter.pricing = _pricing(client, model["resolved"])
    except KeyboardInterrupt:
        return session.interrupted(sys.stdout)
    return session.run(sys.stdout)


def _pricing(client: Client, model_id: str) -> Pricing:
    for model in client.models()["data"]:
        if model["id"] == model_id:
            return Pricing(**model["pricing"])
    return Pricing()


class AskSession:
    """One answer streamed to the terminal: the text, a status line with the server's token count
    (polled at most every ``poll_seconds``), and one distinct ending for a completed, failed or
    cancelled job, each with its tokens and cost."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        meter: JobMeter,
        say: Console,
        *,
        transport: str = "sse",
        poll_seconds: float = 1.0,
        cancel_wait_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.meter = meter
        self.say = say
        self.transport = transport
        self.poll_seconds = poll_seconds
        self.cancel_wait_seconds = cancel_wait_seconds
        self._clock = clock
        self._sleep = sleep
        self._polled_at: float | None = None

    def run(self, out: Any) -> int:
        writer = AnswerWriter(out, self.meter)
        stream: JobStream | None = None
        printed = 0  # the last chunk written out (the stream counts one earlier)
        try:
            try:
                # Started inside the Ctrl-C handling, and whole: a Ctrl-C as the status line appeared
                # went past the cancel (the job ran on, billed) and left the line and a hidden cursor.
                with _ctrl_c_held():
                    writer.start()
                stream = self.client.stream(self.job_id, transport=self.transport, on_progress=self._progress)
                for text in stream:
                    with _ctrl_c_held():  # a chunk is printed and counted, or neither
                        writer.write(text)
                        printed = stream.last_sequence_id
            except KeyboardInterrupt:
                # The stream takes a chunk before it hands its text over (and may poll the job in
                # between): the rest is read from the last chunk printed, never from the stream's.
                if stream is not None:
                    stream.close()
                writer.pause()
                return self._interrupted(writer, printed)
            finally:
                writer.finish()
        except BrokenPipeError:
            # Whoever read the answer stopped (``spool ask ... | head``): nobody reads the rest, so it
            # is not paid for either, as with Ctrl-C; the cancel is sent, not waited for.
            if stream is not None:
                stream.close()
            _stdout_closed()
            try:
                self.client.cancel(self.job_id)
            except SpoolError as exc:
                self.say.print(f"output closed; {self.job_id} was not cancelled: {exc}", style="yellow")
            else:
                self.say.print(
                    f"output closed: cancelled {self.job_id} (its partial output stays)", style="yellow"
                )
            return EXIT_BROKEN_PIPE
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            # The terminal closed under the answer, and a write failed before SIGHUP's handler ran
            # (the kernel sends both at once): as after a hangup, the job is cancelled.
            _terminal_gone([out, sys.stderr])
            if stream is not None:
                stream.close()
            return self._interrupted(writer, printed)
        except (ConnectionFailed, Unauthorized) as lost:
            # The stream, not the job: it goes on (or on where the stack runs again), and what was
            # not printed is read with the command below (a new key's, if this one was revoked).
            lost.suggestions.insert(
                0,
                f"Job {self.job_id} goes on: read the rest with"
                f" 'spool jobs chunks {self.job_id} --after {printed}'"
                + (" and an active key" if isinstance(lost, Unauthorized) else " once the stack answers"),
            )
            raise
        except JobFailed as failed:
            self._failed(failed)
            return EXIT_FAILED
        except JobCancelled as cancelled:
            usage, cost = self._usage_and_cost(cancelled.usage, cancelled.cost_usd)
            self._ending("cancelled", "yellow", f"the job was cancelled elsewhere; {_tokens(usage)}", cost)
            return EXIT_FAILED
        # The job as the server recorded it: its usage, cost and generation times (the rate seen here
        # also counts the network, and a backlog read at once).
        job = self.client.job(self.job_id, output=False)
        usage, cost = job["usage"], job["cost_usd"]
        self.meter.saw_tokens(usage.get("output_tokens"))
        rate = _generation_rate(job) or self.meter.rate
        speed = f", {rate:,.0f} tok/s" if rate else ""
        elapsed = self._clock() - self.meter.started
        self._ending("completed", "green", f"{_tokens(usage)} ({elapsed:.1f} s{speed})", cost)
        return EXIT_OK

    def _progress(self, progress: dict[str, Any]) -> None:
        self.meter.saw_tokens(progress.get("tokens_generated"))
        now = self._clock()
        if self._polled_at is not None and now - self._polled_at < self.poll_seconds:
            return
        self._polled_at = now
        try:
            job = self.client.job(self.job_id, output=False)
        except SpoolError:
            return  # the status line is best effort; the stream itself retries and reports
        self.meter.saw_tokens(job["progress"]["tokens_generated"])

    def _usage_and_cost(
        self, usage: dict[str, Any] | None, cost: float | None
    ) -> tuple[dict[str, Any], float | None]:
        if usage is None or cost is None:
            job = self.client.job(self.job_id, output=False)
            usage, cost = job["usage"], job["cost_usd"]
        return usage, cost

    def _failed(self, failed: JobFailed) -> None:
        usage, cost = self._usage_and_cost(failed.usage, failed.cost_usd)
        self.say.print(f"failed: {failed.code}: {failed.message}", style="bold red")
        for suggestion in failed.suggestions:
            self.say.print(f"  - {suggestion}")
        partial = f" (the partial answer above ends at chunk {failed.last_sequence_id})"
        self.say.print(
            f"  {_tokens(usage)}, {_money(cost)}{partial if failed.last_sequence_id else ''} · {self.job_id}",
            style="red",
        )

    def interrupted(self, out: Any) -> int:
        """Ctrl-C after the job was made, before its answer began to stream: cancelled all the same,
        with the same ending (and what it wrote until it stopped)."""
        return self._interrupted(AnswerWriter(out, self.meter), 0)

    def _interrupted(self, writer: AnswerWriter, after: int) -> int:
        """Ctrl-C: cancel the job, wait (bounded) until it has stopped, print the text it wrote until
        then (the partial answer it keeps, whole), and say what it cost."""
        self.say.print(f"cancelling {self.job_id} (Ctrl-C again to stop waiting)...", style="yellow")
        try:
            job = self.client.cancel(self.job_id)
            deadline = self._clock() + self.cancel_wait_seconds
            while job["status"] not in {"completed", "failed", "cancelled"} and self._clock() < deadline:
                self._sleep(0.2)
                job = self.client.job(self.job_id, output=False)
            if job["status"] in {"completed", "failed", "cancelled"}:
                self._write_rest(writer, after)
        except KeyboardInterrupt:
            writer.finish()
            self.say.print(
                f"cancelled: stopped waiting; the job {self.job_id} is being cancelled", style="yellow"
            )
            return EXIT_INTERRUPTED
        except SpoolError as exc:  # the cancel did not get through (Spool unreachable, say)
            writer.finish()
            self.say.print(
                f"not cancelled: {exc}; the job {self.job_id} may still run and be billed —"
                f" cancel it with spool jobs cancel {self.job_id}",
                style="bold red",
            )
            return EXIT_INTERRUPTED
        writer.finish()
        tokens = job["progress"]["tokens_generated"]
        if job["status"] == "cancelled":
            detail = f"stopped after {tokens:,} tokens; {_tokens(job['usage'])}"
            self._ending("cancelled", "yellow", detail, job["cost_usd"])
        else:  # it ended before the cancel reached it
            self._ending(
                job["status"], "yellow", f"before the cancel; {_tokens(job['usage'])}", job["cost_usd"]
            )
        return EXIT_INTERRUPTED

    def _write_rest(self, writer: AnswerWriter, after: int) -> None:
        """The chunks after ``after`` of the ended job: what the worker wrote between the interrupt
        and its stop (the read is best effort: the answer's end is also at ``spool jobs get``)."""
        with contextlib.suppress(SpoolError):
            for chunk in self.client.stream_chunks(self.job_id, after):
                writer.write(chunk["text"])

    def _ending(self, status: str, style: str, detail: str, cost: float | None) -> None:
        self.say.print(f"{status}: {detail}, {_money(cost)} · {self.job_id}", style=style)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C held back until the block has run: raised after it, not in it. A SIGINT arriving as a
    chunk's text had gone out, before it was counted as printed, printed that chunk twice once the
    rest was read. Only where Ctrl-C raises (the main thread, SIGINT not ignored)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stops_as_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal closed) taken as a Ctrl-C: the job is cancelled, not left
    running and billed for nobody. Passed on to SIGINT's own handler, so that ``_ctrl_c_held`` holds
    it back mid-write as it does a Ctrl-C. After a hangup the terminal is gone and a write to it
    fails (EIO): what was a terminal is pointed at /dev/null, so that the cancel is still sent.
    Only in the main thread, and not for a signal ignored on purpose (``nohup`` ignores SIGHUP); a
    handler of someone else's (coverage's, which saves its data on SIGTERM and then dies by it) is
    replaced for the command's time and given back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminals = [stream for stream in (sys.stdout, sys.stderr) if is_terminal(stream)]

    def as_ctrl_c(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            _terminal_gone(terminals)
        ctrl_c = signal.getsignal(signal.SIGINT)
        if not callable(ctrl_c):  # SIGINT ignored (a background job's): raised all the same
            raise KeyboardInterrupt
        ctrl_c(signal.SIGINT, frame)

    previous = {
        signum: signal.signal(signum, as_ctrl_c)
        for signum in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(signum) != signal.SIG_IGN
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _terminal_gone(terminals: list[Any] | None = None) -> None:
    """Point what was a terminal at /dev/null: once it closed, every write to it fails (EIO)."""
    streams = (sys.stdout, sys.stderr) if terminals is None else terminals
    for stream in streams:
        _to_devnull(stream)


def _generation_rate(job: dict[str, Any]) -> float | None:
    """Output tokens per second between the job's first token and its end, by the server's clock."""
    first, end = job.get("first_token_at"), job.get("completed_at")
    if not first or not end:
        return None
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(first)).total_seconds()
    tokens = (job.get("usage") or {}).get("output_tokens") or 0
    return tokens / seconds if seconds > 0 and tokens > 1 else None


def _tokens(usage: dict[str, Any]) -> str:
    return f"{usage.get('input_tokens', 0):,} tokens in, {usage.get('output_tokens', 0):,} out"


def _sync(client: Client, directory: str, ttl: int | None, say: Console) -> dict[str, Any]:
    """A directory synced as a context, with progress bars on a terminal and a line saying what
    happened: the version, what was skipped and why, or that nothing changed. ``ttl`` (given with
    --ttl) also renews an unchanged context's expiry, which a sync otherwise keeps."""
    with SyncProgress(say) as progress:
        try:
            summary = client.sync_directory(directory, ttl_seconds=ttl or DEFAULT_TTL, progress=progress)
        except KeyboardInterrupt:
            if "upload" in progress.stages_seen:  # sent, maybe applied: its answer never came
                say.print(
                    "the upload was sent: the server may have applied it without this sync knowing"
                    " (the next sync reads what the context holds; a context made afresh shows in"
                    " 'spool contexts list': delete it, or let it expire)",
                    style="yellow",
                )
            raise
    files = f"{summary['file_count']:,} files, {summary['token_count']:,} tokens"
    if summary.get("changed") is False and ttl is not None:
        renewed = client.patch_context(summary["context_id"], ttl_seconds=ttl)
        summary = {**summary, **renewed}
        say.print(
            f"context {summary['context_id']} unchanged, its expiry renewed to {summary['expires_at']}"
            f" (version {summary['version']}: {files})"
        )
    elif summary.get("changed") is False:
        say.print(f"context {summary['context_id']} unchanged (version {summary['version']}: {files})")
    else:
        via = summary.get("uploaded_via")
        how = f", uploaded {'by diff' if via == 'patch' else via}" if via and via != "none" else ""
        say.print(f"context {summary['context_id']} version {summary['version']}: {files}{how}")
    if note := skipped_note(summary.get("skipped") or []):
        say.print(note, style="yellow")
    return summary


# ------------------------------------------------------------------------------------- read-only
def _models(args: argparse.Namespace) -> int:
    models = _client(args).models()["data"]
    if args.json:
        _print_json(models)
        return EXIT_OK
    rows = [
        (
            m["id"],
            ", ".join(m.get("aliases") or []),
            f"{m['context_window']:,}",
            f"{m.get('max_output_tokens', 0):,}",
            f"${m['pricing']['input_per_mtok']:g}",
            f"${m['pricing']['output_per_mtok']:g}",
            ", ".join(m.get("fallbacks") or []) or "-",
            m.get("status", ""),
        )
        for m in models
    ]
    columns = [
        "MODEL",
        "ALIASES",
        "CONTEXT",
        "MAX OUTPUT",
        "IN /MTOK",
        "OUT /MTOK",
        "FALLBACKS",
        "STATUS",
    ]
    _print_listing(
        columns,
        rows,
        numbers=("CONTEXT", "MAX OUTPUT", "IN /MTOK", "OUT /MTOK"),
        drop=("FALLBACKS", "ALIASES", "MAX OUTPUT", "OUT /MTOK", "IN /MTOK", "CONTEXT"),
    )
    return EXIT_OK


def _usage(args: argparse.Namespace) -> int:
    usage = _client(args).usage(
        args.since.isoformat() if args.since else None, args.until.isoformat() if args.until else None
    )
    if args.json:
        _print_json(usage)
        return EXIT_OK
    rows: list[tuple[Any, ...]] = [
        (
            d["date"],
            d["model"],
            f"{d['jobs']:,}",
            f"{d['input_tokens']:,}",
            f"{d['output_tokens']:,}",
            _money(d["cost_usd"]),
        )
        for d in usage["days"]
    ]
    totals = usage["totals"]
    rows.append(
        (
            "total",
            "",
            f"{totals['jobs']:,}",
            f"{totals['input_tokens']:,}",
            f"{totals['output_tokens']:,}",
            _money(totals["cost_usd"]),
        )
    )
    columns = [
        "DAY",
        "MODEL",
        "JOBS",
        "TOKENS IN",
        "TOKENS OUT",
        "COST",
    ]
    _print_listing(
        columns,
        rows,
        title=f"usage {usage['since']} to {usage['until']}",
        numbers=("JOBS", "TOKENS IN", "TOKENS OUT", "COST"),
        drop=("JOBS", "TOKENS IN", "TOKENS OUT", "MODEL"),
        keep=("DAY", "COST"),
    )
    out = output_console()
    out.print()
    for line in _limit_lines(usage.get("limits") or {}):
        out.print(line)
    return EXIT_OK


def _limit_lines(limits: dict[str, Any]) -> Iterator[str]:
    for name, label in (("tokens_per_minute", "tokens per minute"), ("tokens_per_day", "tokens per day")):
        if bucket := limits.get(name):
            reset = f", full again in {bucket['reset_seconds']:,} s" if bucket.get("reset_seconds") else ""
            yield f"{label}: {bucket['remaining']:,} of {bucket['limit']:,} left{reset}"
    if jobs := limits.get("concurrent_jobs"):
        yield f"concurrent jobs: {jobs['running']:,} running of {jobs['limit']:,}"
    if budget := limits.get("daily_budget"):
        cap = _money(budget["limit_usd"]) if budget.get("limit_usd") is not None else "no limit"
        committed = _money(budget["committed_usd"])
        yield f"daily budget: {committed} committed, {cap} (resets {budget['reset_at']})"


def _health(args: argparse.Namespace) -> int:
    # One attempt, bounded: a check answers within its own few seconds (the health function's probes
    # have 3 s, its timeout is 10 s), so a stack that does not answer in --timeout is reported as
    # unreachable instead of being waited on through the usual retries (~90 s on a hung server).
    report = _client(args, timeout=args.timeout, max_retries=0).health(deep=args.deep)
    if args.json:
        _print_json(report)
    else:
        out = output_console()
        rows = []
        for name, check in report.get("checks", {}).items():
            facts = {k: v for k, v in check.items() if k not in {"status", "latency_ms", "models", "error"}}
            detail = ", ".join(_health_fact(k, v) for k, v in facts.items() if v is not None)
            if check.get("error"):
                detail = f"{check['error']}" + (f"; {detail}" if detail else "")
            for model, state in (check.get("models") or {}).items():
                detail += (", " if detail else "") + f"{model}: circuit {state.get('circuit')}"
            latency = check.get("latency_ms")
            rows.append(
                (name, check.get("status", ""), f"{latency:,.0f} ms" if latency is not None else "", detail)
            )
        out.print(f"{report.get('status', 'unknown')} (checked at {report.get('checked_at', '?')})")
        _print_listing(
            ["CHECK", "STATUS", "LATENCY", "DETAILS"],
            rows,
            numbers=("LATENCY",),
            drop=("DETAILS", "LATENCY"),
            keep=("CHECK", "STATUS"),
        )
    return EXIT_OK if report.get("status") == "ok" else EXIT_FAILED


def _health_fact(name: str, value: Any) -> str:
    """One fact of a check as a reader wants it: the deep probe as a sentence, not a raw mapping."""
    if name == "deep" and isinstance(value, dict):
        latency = value.get("latency_ms")
        said = [f"probe of {value.get('model', '?')} {value.get('status', '?')}"]
        said += [f"{latency:,.0f} ms"] if latency is not None else []
        said += [value["error"]] if value.get("error") else []
        said += (
            [f"cached from {value['checked_at']}"] if value.get("cached") and value.get("checked_at") else []
        )
        return " ".join(said[:1]) + (f" ({', '.join(said[1:])})" if said[1:] else "")
    if isinstance(value, dict):
        return f"{name}: " + ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return f"{name}={value}"


JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def _jobs_list(args: argparse.Namespace) -> int:
    client = _client(args)
    more = False
    if args.all:
        jobs = list(client.iter_jobs(status=args.status, page_size=args.limit))
    else:
        page = client.list_jobs(status=args.status, limit=args.limit)
        jobs, more = page["data"], bool(page.get("next_cursor"))
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    rows = []
    for job in jobs:
        usage = job.get("usage") or {}
        output_tokens = usage.get("output_tokens") or (job.get("progress") or {}).get("tokens_generated", 0)
        rows.append(
            (
                job["job_id"],
                job["status"],
                (job.get("model") or {}).get("resolved", ""),
                f"{usage.get('input_tokens', 0):,}",
                f"{output_tokens:,}",
                _money(job.get("cost_usd")),
                job.get("created_at", ""),
            )
        )
    if not jobs:
        message_console().print("no jobs" + (f" {args.status}" if args.status else ""))
        return EXIT_OK
    columns = ["JOB ID", "STATUS", "MODEL", "IN", "OUT", "COST", "CREATED"]
    _print_listing(
        columns, rows, numbers=("IN", "OUT", "COST"), drop=("CREATED", "MODEL", "IN", "COST", "OUT")
    )
    if more:
        message_console().print(f"showing the {len(jobs)} newest; --all lists every one", style="dim")
    return EXIT_OK


def _jobs_get(args: argparse.Namespace) -> int:
    _print_json(_client(args).job(args.job_id, output=not args.no_output))
    return EXIT_OK


def _jobs_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    status = job["status"]
    if status in {"queued", "running"}:  # its worker stops at its next flush, keeping what it wrote
        status = f"cancel requested ({status}; its worker stops within a flush, the output so far kept)"
    message_console().print(f"{args.job_id}: {status}")
    return EXIT_OK


def _jobs_chunks(args: argparse.Namespace) -> int:
    for chunk in _client(args).stream_chunks(args.job_id, args.after):
        print(json.dumps(chunk))
    return EXIT_OK


def _contexts_list(args: argparse.Namespace) -> int:
    client = _client(args)
    more = False
    if args.all:
        contexts = list(client.iter_contexts(page_size=args.limit))
    else:
        page = client.list_contexts(limit=args.limit)
        contexts, more = page["data"], bool(page.get("next_cursor"))
    if args.json:
        _print_json(contexts)
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        (
            c["context_id"],
            str(c.get("version", "")),
            f"{c.get('file_count', 0):,}",
            f"{c.get('token_count', 0):,}",
            _size(c.get("size_bytes", 0)),
            c.get("updated_at") or c.get("created_at", ""),
            _expires(c.get("expires_at") or "", now),
        )
        for c in contexts
    ]
    columns = [
        "CONTEXT ID",
        "VERSION",
        "FILES",
        "TOKENS",
        "SIZE",
        "UPDATED",
        "EXPIRES",
    ]
    if not contexts:
        message_console().print("no contexts")
        return EXIT_OK
    _print_listing(
        columns,
        rows,
        numbers=("VERSION", "FILES", "TOKENS", "SIZE"),
        drop=("EXPIRES", "UPDATED", "SIZE", "FILES", "VERSION", "TOKENS"),
    )
    if more:
        message_console().print(f"showing the {len(contexts)} newest; --all lists every one", style="dim")
    return EXIT_OK


def _print_listing(
    columns: list[str],
    rows: Sequence[Sequence[Any]],
    *,
    numbers: tuple[str, ...],
    drop: tuple[str, ...],
    keep: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """A listing on stdout, its first column the ids (and the columns in ``keep``): never cut,
    whatever the terminal's width (the columns in ``drop`` are left out first, in that order)."""
    out = output_console()
    keep = keep or (columns[0],)
    # never cropped: on a terminal narrower than the ids, a row goes on the next line, its ids whole
    out.print(table(title, columns, rows, numbers=numbers, width=out.width, keep=keep, drop=drop), crop=False)


def _expires(expires_at: str, now: datetime) -> str:
    """A context's expiry, marked once it has passed: an expired context stays listed until DynamoDB's
    TTL deletes it (lazily), and answers 410 to every use meanwhile."""
    try:
        passed = datetime.fromisoformat(expires_at) <= now
    except ValueError:  # none, or not a time: shown as it came
        return expires_at
    return f"{expires_at} (expired)" if passed else expires_at


def _size(size: int) -> str:
    from rich.filesize import decimal

    return decimal(size)


def _contexts_sync(args: argparse.Namespace) -> int:
    summary = _sync(_client(args), args.directory, args.ttl, message_console())
    if args.json:
        _print_json(summary)
    else:
        print(summary["context_id"])
    return EXIT_OK


def _contexts_get(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_context(args.context_id))
    return EXIT_OK


def _contexts_delete(args: argparse.Namespace) -> int:
    _client(args).delete_context(args.context_id)
    message_console().print(f"deleted {args.context_id}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    """The tour: a stack (started here unless --url is given), Spool's own job engine as context (the
    code the question is about; the whole of ``spool_core`` outgrew the simulated models' 128,000-token
    window as the project grew), an answer streamed as Server-Sent Events, the connection dropped
    mid-answer and resumed from Last-Event-ID, usage and cost."""
    from spool.devstack.stack import PROJECT_ROOT, EmbeddedStack

    stack = None
    if not (args.url or os.environ.get("SPOOL_URL")):
        if not os.environ.get("SPOOL_LOG_LEVEL"):  # the tour's own lines, not the stack's request log
            logging.getLogger("devstack").setLevel(logging.WARNING)
        print("starting the embedded stack...", file=sys.stderr, flush=True)
        stack = EmbeddedStack(port=0, ws_port=0).start()
        args.url, args.key = stack.base_url, stack.api_key
    try:
        client = _client(args)
        summary = client.sync_directory(PROJECT_ROOT / "shared" / "spool_core" / "jobs", ttl_seconds=3600)
        print(
            f"uploaded Spool's job engine (shared/spool_core/jobs): {summary['file_count']} files,"
            f" {summary['token_count']:,} tokens "
            f"-> {summary['context_id']}",
            file=sys.stderr,
            flush=True,
        )
        job = client.create_job(
            "How does Spool keep a stream resumable?",
            context_id=summary["context_id"],
            model="sim-realtime",
            max_tokens=args.max_tokens,
        )
        print(
            f"job {job['job_id']} on {job['model']['resolved']}, streaming its events (SSE) from\n"
            f"  {client.base_url}/v1/jobs/{job['job_id']}/events\n",
            file=sys.stderr,
            flush=True,
        )
        last = 0
        for chunk in client.events(job["job_id"]):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            last = chunk["sequence_id"]
            if last == args.drop_after:
                break  # closing the stream drops the connection
        print(
            f"\n\n[connection dropped after chunk {last}; reconnecting with Last-Event-ID: {last}]\n",
            file=sys.stderr,
            flush=True,
        )
        dropped_at, resumed = last, []
        for chunk in client.events(job["job_id"], last):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            resumed.append(chunk["sequence_id"])
        if resumed:
            print(
                f"\n\n[resumed at chunk {resumed[0]}: {len(resumed)} more chunks after the reconnect]",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"\n\n[the answer had ended before the drop after chunk {dropped_at}: nothing to resume;"
                " a smaller --drop-after shows one]",
                file=sys.stderr,
                flush=True,
            )
        final = client.job(job["job_id"])
        usage = final["usage"]
        print(
            f"\n\n[{final['status']}: {final['progress']['chunks_written']} chunks, none lost or repeated; "
            f"{usage['input_tokens']:,} tokens in, {usage['output_tokens']:,} out, ${final['cost_usd']:.6f}]",
            file=sys.stderr,
            flush=True,
        )
        return 0
    finally:
        if stack:
            stack.stop()


def _admin_target(args: argparse.Namespace) -> Any:
    from spool.admin import resolve

    return resolve(args.url, args.stack_name, args.endpoint_url)


def _keys(args: argparse.Namespace) -> int:
    """API keys in the key table of a stack (the local one, or a deployed one): create, list, revoke,
    rotate. A key is shown once, on stdout, when it is made; the table keeps only its hash."""
    from spool.admin import aws_errors
    from spool_core.adapters.api_keys import DynamoApiKeyStore
    from spool_core.auth import ApiKeys, KeyCache
    from spool_core.tenancy import Tenant

    target = _admin_target(args)
    tenant = Tenant(args.tenant) if args.tenant else None
    with aws_errors(target):
        table = args.table or target.resource("ApiKeysTable")
        # No cache: an operator reads and changes the table itself, never a remembered copy.
        keys = ApiKeys(DynamoApiKeyStore(target.client("dynamodb"), table), cache=KeyCache(0))
        if args.action == "create":
            assert tenant is not None  # argparse requires --tenant for create
            key, record = keys.create(tenant, args.description)
            _ensure_usage_key(args, target, record.tenant_id)
            print(key)
            print(
                f"tenant {record.tenant_id}, key id {record.key_id} in {target.description}:"
                " store the key now, it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            _print_keys(keys.summaries(tenant), as_json=args.json)
        elif args.action == "revoke":
            record = keys.revoke(args.key_id, tenant=tenant)
            print(f"revoked {record.key_id} (tenant {record.tenant_id}) at {record.revoked_at}")
            print(
                f"requests with it are refused within {_KEY_CACHE_NOTE}; open WebSocket connections"
                " made with it are closed within the same time. The record stays, for audit.",
                file=sys.stderr,
            )
        else:
            rotation = keys.rotate(
                args.key_id, grace_seconds=args.grace, tenant=tenant, description=args.description
            )
            _ensure_usage_key(args, target, rotation.new.tenant_id)
            print(rotation.key)
            old = rotation.old
            until = (
                f"keeps working until {old.expires_at}"
                if old.status == "active"
                else f"was revoked (refused within {_KEY_CACHE_NOTE})"
            )
            print(
                f"tenant {rotation.new.tenant_id}: new key id {rotation.new.key_id} in {target.description}"
                f" (store the key now, it is not shown again); the old key {old.key_id} {until}",
                file=sys.stderr,
            )
    return EXIT_OK


_KEY_CACHE_NOTE = "the functions' key cache lifetime (SPOOL_AUTH_CACHE_SECONDS, 30 s unless configured)"


def _print_keys(summaries: list[dict[str, Any]], *, as_json: bool) -> None:
    """A table for people (UNTIL: when a revoked key stopped, or a rotated one stops), JSON for scripts."""
    if as_json:
        _print_json(summaries)
        return
    if not summaries:
        message_console().print("no keys")
        return
    rows = [
        (
            s["key_id"],
            s["tenant"],
            s["status"],
            s["created_at"],
            (s["revoked_at"] if s["status"] == "revoked" else s["expires_at"]) or "",
            s["description"],
        )
        for s in summaries
    ]
    _print_listing(
        ["KEY ID", "TENANT", "STATUS", "CREATED", "UNTIL", "DESCRIPTION"],
        rows,
        numbers=(),
        drop=("DESCRIPTION", "CREATED", "UNTIL"),
        keep=("KEY ID", "TENANT", "STATUS"),
    )


def _ensure_usage_key(args: argparse.Namespace, target: Any, tenant_id: str) -> None:
    """On AWS, the tenant's API Gateway API key must be in the stack's usage plan, or API Gateway
    refuses its requests (403): the authorizer names that key (``usageIdentifierKey``). The local
    gateway has no usage plans, so the local stack needs nothing."""
    if not args.stack_name:
        return
    from spool_core.adapters.api_keys import ApiGatewayUsageKeys

    plan = args.usage_plan_id or _stack_output(target, args.stack_name, "UsagePlanId")
    if not plan:
        print(
            f"note: stack {args.stack_name} has no UsagePlanId output (no usage plan): "
            "no API Gateway usage key registered",
            file=sys.stderr,
        )
        return
    api_key_id = ApiGatewayUsageKeys(target.client("apigateway"), plan).ensure(tenant_id)
    print(f"tenant {tenant_id}: API Gateway key {api_key_id} is in usage plan {plan}", file=sys.stderr)


def _stack_output(target: Any, stack_name: str, name: str) -> str | None:
    stacks = target.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"]
    for output in stacks[0].get("Outputs", []) if stacks else []:
        if output.get("OutputKey") == name:
            return str(output["OutputValue"])
    return None


def _limits(args: argparse.Namespace) -> int:
    """A tenant's own limits in the usage table: read at every admission, so a change applies to the
    tenant's next job; without limits of its own, the deployment's defaults apply."""
    from spool.admin import aws_errors

    target = _admin_target(args)
    with aws_errors(target):
        return _tenant_limits(args, target)


def _tenant_limits(args: argparse.Namespace, target: Any) -> int:
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.usage import DynamoUsageStore
    from spool_core.limits.model import TenantLimits
    from spool_core.limits.service import set_tenant_limits
    from spool_core.tenancy import Tenant, TenantScope
    from spool_core.units import nanos, usd

    table = ScopedTable(
        target.client("dynamodb"), target.resource("UsageTable"), TenantScope(Tenant(args.tenant))
    )
    store = DynamoUsageStore(table)
    current = store.limits()
    if args.action == "reset":
        # the buckets carried over to the defaults, as any change of limits carries them over
        set_tenant_limits(store, None, defaults=target.limit_defaults())
        print(f"tenant {args.tenant} now has the deployment's default limits ({target.description})")
        return 0
    changes = ("tokens_per_minute", "tokens_per_day", "max_concurrent_jobs", "daily_budget_usd")
    given = ["--" + name.replace("_", "-") for name in changes if getattr(args, name) is not None]
    if args.action != "set" and given:
        print(f"error: {', '.join(given)} only go with 'limits set' (nothing was changed)", file=sys.stderr)
        return 2
    if args.action == "set":
        fields = {
            "tokens_per_minute": args.tokens_per_minute,
            "tokens_per_day": args.tokens_per_day,
            "max_concurrent_jobs": args.max_concurrent_jobs,
        }
        # A first set starts from the deployment's default budget (the token limits it must name):
        # a tenant's own limits that dropped it would lift a budget nobody meant to lift.
        base = (
            current._asdict()
            if current
            else {"daily_budget_nanos": target.limit_defaults().daily_budget_nanos}
        )
        missing = [name for name, value in fields.items() if value is None and name not in base]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            print(f"error: a tenant's first limits need {flags}", file=sys.stderr)
            return 2
        budget = base.get("daily_budget_nanos")
        if args.daily_budget_usd is not None:
            budget = nanos(args.daily_budget_usd) if args.daily_budget_usd > 0 else None
        current = TenantLimits(
            **{name: value if value is not None else base[name] for name, value in fields.items()},
            daily_budget_nanos=budget,
        )
        # a budget that starts now counts today's spend so far; the buckets are carried over
        set_tenant_limits(store, current, defaults=target.limit_defaults())
    if current is None:
        print(f"tenant {args.tenant} has no limits of its own: the deployment's defaults apply")
        return 0
    _print_json(
        {
            "tenant": args.tenant,
            "tokens_per_minute": current.tokens_per_minute,
            "tokens_per_day": current.tokens_per_day,
            "max_concurrent_jobs": current.max_concurrent_jobs,
            "daily_budget_usd": usd(current.daily_budget_nanos)
            if current.daily_budget_nanos is not None
            else None,
        }
    )
    return 0


MAX_GRACE_SECONDS = 90 * 86_400  # a rotation's overlap; beyond it the new key is stored, never shown
MAX_LIMIT = 10**15  # a tenant's token bucket or concurrent jobs: far above any real use, still exact
MAX_DAILY_BUDGET_USD = 10**9


def _spool_command() -> str:
    """``spool`` as the user can type it: the bare name when it is on PATH, else the virtual
    environment's script (``make dev`` does not activate the venv), relative when that is shorter."""
    script = Path(sys.executable).with_name("spool")
    found = shutil.which("spool")
    if found and Path(found).resolve() == script.resolve():
        return "spool"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 0 <= value <= MAX_GRACE_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_GRACE_SECONDS} seconds (90 days)")
    return value


def _question(text: str) -> str:
    """A question with something in it: an empty one was a job, generated and billed, from nothing."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the question is empty")
    return text


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high:,}")
        return value

    return parse


def _dollars(text: str) -> float:
    """A daily budget: 0 (none) or a positive, finite number of dollars (``nan`` removed a budget
    without a word, ``inf`` crashed, ``-3`` removed it too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of dollars: {text!r}") from None
    if not math.isfinite(value) or value < 0 or value > MAX_DAILY_BUDGET_USD or 0 < value < 1e-9:
        # (under a billionth of a dollar, a nano-dollar budget is 0: every job refused)
        raise argparse.ArgumentTypeError(f"must be 0 (no budget) or $0.000000001 to {MAX_DAILY_BUDGET_USD:,}")
    return value


def _tenant(text: str) -> str:
    """A tenant id as the key and usage tables take it (an empty one listed every tenant's keys, a
    malformed one crashed as an unexpected error)."""
    from spool_core.tenancy import InvalidTenantId, Tenant

    try:
        return Tenant(text).id
    except InvalidTenantId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day as YYYY-MM-DD: {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, such as \'{"team": "web"}\'')
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("spool")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class HelpFormatter(RichHelpFormatter):
    """rich-argparse's help, with each option's default (when it has a meaningful one) after its text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default in (None, False, "", argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spool",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="Run 'spool COMMAND --help' for a command's options. Exit codes: 0 done, 1 the job failed"
        " or a check is unhealthy, 2 an error (the line says why), 130 interrupted (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, parents: list[argparse.ArgumentParser], sub: Any = commands
    ) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            parents=[common, *parents],
            formatter_class=HelpFormatter,
        )
        made.set_defaults(parser=made)  # an unknown option is reported with this command's usage
        return made

    dev = command("dev", "run the embedded stack on this machine (what 'make dev' runs)", [])
    dev.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    dev.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SPOOL_PORT", "8000")),
        help="API port, 0 for any free one; SPOOL_PORT sets it too",
    )
    dev.add_argument("--config-env", default="local", help="samconfig.toml environment to read")
    dev.add_argument(
        "--parameter-overrides",
        default=os.environ.get("SPOOL_PARAMETER_OVERRIDES", ""),
        help="template parameters, as sam deploy takes them: 'Key=Value Key2=Value2'"
        " (SPOOL_PARAMETER_OVERRIDES)",
    )
    dev.add_argument(
        "--ws-port",
        type=int,
        default=int(os.environ["SPOOL_WS_PORT"]) if os.environ.get("SPOOL_WS_PORT") else None,
        help="WebSocket port (SPOOL_WS_PORT; default: the API port + 1 if free, else any free port)",
    )
    dev.add_argument(
        "--workers",
        type=int,
        default=int(os.environ["SPOOL_WORKERS"]) if os.environ.get("SPOOL_WORKERS") else None,
        help="jobs the local worker runs at once (SPOOL_WORKERS sets it too; default: 16 per CPU,"
        " at most the template's WorkerMaxConcurrency)",
    )
    dev.add_argument(
        "--state-dir",
        default=os.environ.get("SPOOL_STATE_DIR") or None,
        help="keep tables, objects and queued messages here across a clean stop and start"
        " (SPOOL_STATE_DIR; default: nothing is kept)",
    )
    dev.set_defaults(run=_dev)

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url",
        default=os.environ.get("SPOOL_URL") or DEFAULT_URL,
        help="Spool's base URL; SPOOL_URL sets it too",
    )
    remote.add_argument(
        "--key", default=None, help="API key (SPOOL_API_KEY; default: the local stack's dev key)"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")

    ask = command(
        "ask", "ask a question, about a directory if you give one, and watch the answer stream", [remote]
    )
    ask.add_argument("question", type=_question, help="what to ask")
    ask.add_argument(
        "--context", metavar="DIR", help="directory to upload (or update by diff) as the question's context"
    )
    ask.add_argument("--model", default="default", help="model id or alias (see 'spool models')")
    ask.add_argument(
        "--max-tokens", type=_bounded(1, 1_000_000), default=1024, help="longest answer, in tokens"
    )
    ask.add_argument("--ttl", type=_bounded(1, 604_800), default=None, help=TTL_HELP)
    ask.add_argument("--metadata", type=_json_object, default=None, help="the job's metadata, a JSON object")
    ask.add_argument(
        "--transport",
        choices=["sse", "websocket", "poll"],
        default="sse",
        help="how the answer streams: Server-Sent Events, the WebSocket API, or long-polling",
    )
    ask.set_defaults(run=_ask)

    models = command(
        "models", "the models you can use: aliases, context window, prices, fallbacks", [remote, as_json]
    )
    models.set_defaults(run=_models)

    usage = command("usage", "your tokens and cost by day and model, and your limits now", [remote, as_json])
    usage.add_argument(
        "--since", type=_day, help="first UTC day, YYYY-MM-DD (default: 6 days before --until)"
    )
    usage.add_argument("--until", type=_day, help="last UTC day, YYYY-MM-DD (default: today)")
    usage.set_defaults(run=_usage)

    health = command(
        "health",
        "the stack's health: storage, queue and providers (exit 1 unless ok, 2 if it cannot be asked)",
        [remote, as_json],
    )
    health.add_argument(
        "--deep", action="store_true", help="also make a real, minimal provider call (cached by the server)"
    )
    health.add_argument(
        "--timeout",
        type=_bounded(1, 600),
        default=15,
        help="seconds to wait for the report, in one attempt (no retries)",
    )
    health.set_defaults(run=_health)

    demo = command("demo", "the one-command tour (starts a stack unless --url or SPOOL_URL is given)", [])
    demo.add_argument("--url", default=None, help="Spool's base URL (SPOOL_URL; default: start a stack)")
    demo.add_argument("--key", default=None, help="API key (SPOOL_API_KEY; default: the stack's dev key)")
    demo.add_argument("--max-tokens", type=int, default=300, help="longest answer, in tokens")
    demo.add_argument(
        "--drop-after", type=int, default=3, help="drop the connection after this chunk (of ~8 at 300 tokens)"
    )
    demo.set_defaults(run=_demo)

    jobs = command("jobs", "list, inspect or cancel jobs", [])
    job_actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = command("list", "your jobs, newest first", [remote, as_json], job_actions)
    listing.add_argument("--status", choices=JOB_STATUSES, help="only jobs with this status")
    listing.add_argument("--limit", type=_bounded(1, 100), default=20, help="jobs per page")
    listing.add_argument("--all", action="store_true", help="every job, page after page")
    listing.set_defaults(run=_jobs_list)
    get = command("get", "one job, as JSON", [remote], job_actions)
    get.add_argument("job_id", help="the job's id (job_...)")
    get.add_argument("--no-output", action="store_true", help="leave the output out (a small answer)")
    get.set_defaults(run=_jobs_get)
    cancel = command("cancel", "cancel a job (its partial output stays)", [remote], job_actions)
    cancel.add_argument("job_id", help="the job's id (job_...)")
    cancel.set_defaults(run=_jobs_cancel)
    chunks = command("chunks", "a job's chunks, one JSON line each, until it ends", [remote], job_actions)
    chunks.add_argument("job_id", help="the job's id (job_...)")
    chunks.add_argument("--after", type=int, default=0, help="start after this sequence id")
    chunks.set_defaults(run=_jobs_chunks)

    contexts = command("contexts", "list, upload, read or delete contexts", [])
    context_actions = contexts.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = command("list", "your contexts, newest first", [remote, as_json], context_actions)
    listing.add_argument("--limit", type=_bounded(1, 100), default=20, help="contexts per page")
    listing.add_argument("--all", action="store_true", help="every context, page after page")
    listing.set_defaults(run=_contexts_list)
    sync = command(
        "sync",
        "upload a directory as a context, or update it by diff (prints the context id)",
        [remote],
        context_actions,
    )
    sync.add_argument("directory", help="the directory (.gitignore is honoured; binaries are skipped)")
    sync.add_argument("--ttl", type=_bounded(1, 604_800), default=None, help=TTL_HELP)
    sync.add_argument("--json", action="store_true", help="print the context's summary as JSON")
    sync.set_defaults(run=_contexts_sync)
    get = command("get", "one context with its file list, as JSON", [remote], context_actions)
    get.add_argument("context_id", help="the context's id (ctx_...)")
    get.set_defaults(run=_contexts_get)
    delete = command("delete", "delete a context", [remote], context_actions)
    delete.add_argument("context_id", help="the context's id (ctx_...)")
    delete.set_defaults(run=_contexts_delete)

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--url",
        default=os.environ.get("SPOOL_URL") or DEFAULT_URL,
        help="the local stack to manage; SPOOL_URL sets it too",
    )
    target.add_argument(
        "--stack-name",
        help="a deployed stack to manage instead of the local one (AWS credentials as boto3 finds them)",
    )
    target.add_argument("--endpoint-url", help="AWS endpoint for --stack-name (an AWS-compatible endpoint)")
    admin = argparse.ArgumentParser(add_help=False, parents=[target])
    admin.add_argument("--tenant", type=_tenant, required=True, help="the tenant")

    keys = command("keys", "manage API keys: create, list, revoke, rotate", [])
    keys.set_defaults(run=_keys)
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    key_table = argparse.ArgumentParser(add_help=False, parents=[target])
    key_table.add_argument("--table", help="the key table's name, instead of looking it up in the stack")
    usage_plan = argparse.ArgumentParser(add_help=False)
    usage_plan.add_argument(
        "--usage-plan-id",
        help="with --stack-name: the usage plan the tenant's API Gateway key joins"
        " (default: the stack's UsagePlanId output)",
    )
    create = command("create", "a new key for a tenant, printed once", [key_table, usage_plan], key_actions)
    create.add_argument("--tenant", type=_tenant, required=True, help="the tenant the key acts for")
    create.add_argument("--description", default="", help="a note kept with the key")
    listing = command(
        "list", "key id, tenant, status and times; never the key or its hash", [key_table], key_actions
    )
    listing.add_argument("--tenant", type=_tenant, help="only this tenant's keys (default: every tenant's)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    revoke = command(
        "revoke", "stop a key (within the key cache's lifetime); the record stays", [key_table], key_actions
    )
    revoke.add_argument("key_id", help="the key's id (not the key)")
    revoke.add_argument(
        "--tenant",
        type=_tenant,
        help="the key's tenant: looked up with a Query instead of a Scan; another tenant's key is refused",
    )
    rotate = command(
        "rotate",
        "a new key for the same tenant (printed once); the old one is revoked, or ends after --grace",
        [key_table, usage_plan],
        key_actions,
    )
    rotate.add_argument("key_id", help="the key's id (not the key)")
    rotate.add_argument(
        "--tenant",
        type=_tenant,
        help="the key's tenant: looked up with a Query instead of a Scan; another tenant's key is refused",
    )
    rotate.add_argument(
        "--grace",
        type=_seconds,
        default=0,
        help="seconds the old key keeps working beside the new one (0: revoked now)",
    )
    rotate.add_argument("--description", default=None, help="the new key's (default: the old key's)")

    limits = command("limits", "read or change a tenant's limits", [admin])
    limits.add_argument("action", choices=["get", "set", "reset"], help="what to do")
    limits.add_argument(
        "--tokens-per-minute",
        type=_bounded(1, MAX_LIMIT),
        help="the tenant's token bucket per minute (refills continuously)",
    )
    limits.add_argument(
        "--tokens-per-day",
        type=_bounded(1, MAX_LIMIT),
        help="the tenant's token bucket per day (refills over any 24 hours)",
    )
    limits.add_argument(
        "--max-concurrent-jobs", type=_bounded(1, MAX_LIMIT), help="jobs queued or running at once"
    )
    limits.add_argument(
        "--daily-budget-usd", type=_dollars, help="dollars per UTC day (0 removes the budget)"
    )
    limits.set_defaults(run=_limits)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The devstack's own log: one line per request and per job transition (SPOOL_LOG_LEVEL=WARNING
    # quiets it, DEBUG adds each Lambda invocation's REPORT line).
    level = os.environ.get("SPOOL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="spool: %(asctime)s.%(msecs)03d %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "websockets", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report it with the top-level usage, not the command's
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = bool(getattr(args, "debug", False))
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        message_console().print("interrupted", style="yellow")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # ``spool jobs list | head``: the reader has what it wanted
        _stdout_closed()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if debug:
            raise
        return _report(exc, key_given=bool(getattr(args, "key", None) or os.environ.get("SPOOL_API_KEY")))
    return result


def _stdout_closed() -> None:
    """Point stdout at /dev/null: what was buffered for a closed pipe cannot be written, and Python
    would report it again as it exits."""
    _to_devnull(sys.stdout)


def _to_devnull(stream: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _report(exc: Exception, *, key_given: bool = False) -> int:
    """One line for an error (what happened, then what to do), on stderr; the traceback only with --debug."""
    from spool_core.errors import SpoolError as DomainError

    say = message_console()
    if isinstance(exc, ConnectionFailed | CommandError):
        line, suggestions = exc.message, exc.suggestions
    elif isinstance(exc, SpoolError | DomainError):
        line, suggestions = f"{exc.code}: {exc.message}", list(exc.suggestions)
        if isinstance(exc, SpoolError):
            headers = {k.lower(): v for k, v in exc.headers.items()}
            request_id = exc.request_id or headers.get("x-request-id")
            line += f" (request {request_id})" if request_id else ""  # what a report needs
            suggestions = _cli_suggestions(exc, suggestions, key_given=key_given)
    elif isinstance(exc, SyncError):
        line, suggestions = str(exc), []
    else:
        line = f"unexpected {type(exc).__name__}: {exc}"
        suggestions = ["Run again with --debug for the traceback, and report it"]
    say.print(f"error: {line}" + (f" — {'; '.join(suggestions)}" if suggestions else ""), style="bold red")
    return EXIT_ERROR


def _cli_suggestions(exc: SpoolError, suggestions: list[str], *, key_given: bool = False) -> list[str]:
    """The server's suggestions, as the CLI's user can follow them: the server tells an HTTP client
    which header carries the key, the CLI's user needs its option (and the dev key, which is not the
    default one when SPOOL_DEV_KEYS is set); an API URL given with its /v1, as an OpenAI client takes
    it, doubles the /v1 of every path the CLI asks for."""
    if exc.code == "http_error" and not suggestions:  # no Spool envelope: not Spool answering
        return ["Check that SPOOL_URL (or --url) is a Spool API: GET /v1/health answers it"]
    if exc.status == 401:
        first = (
            "The key given (--key or SPOOL_API_KEY) is not one this stack takes: check it, or ask the"
            " operator for a new one ('spool keys create --tenant <tenant>')"
            if key_given
            else "Give your API key with --key or SPOOL_API_KEY (without them the CLI sends sk-local-dev,"
            " the local stack's default dev key; with SPOOL_DEV_KEYS set, make dev prints the dev key)"
        )
        # (the header, the frame and the link an HTTP or WebSocket client would send: the CLI sends them)
        http_only = ("Authorization:", "--key", '{"action"', "links.events")
        return [first, *(s for s in suggestions if not any(part in s for part in http_only))]
    if any("?since=" in s for s in suggestions):  # the server's query, as the CLI's options
        return [s.replace("?since=", "--since ").replace("&until=", " --until ") for s in suggestions]
    if exc.status == 404 and str(exc.details.get("path", "")).startswith("/v1/v1/"):
        return [
            "Drop the /v1 at the end of SPOOL_URL (or --url): the CLI adds it to every path"
            f" (such as {DEFAULT_URL})"
        ]
    return suggestions


if __name__ == "__main__":
    from spool.__main__ import exit_with, ignore_ctrl_c_in_teardown

    ignore_ctrl_c_in_teardown()
    exit_with(main())
