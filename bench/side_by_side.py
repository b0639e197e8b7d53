"""The same loopback OpenAI-compatible upstream read directly and through Spool, side by side.

A local server streams chat completions as the OpenAI API does (Server-Sent Events, one token per
delta, usage at the end) at a rate named by the model (``loop-50``: 50 tokens/s; ``loop-0``: as fast
as it can), with its first token immediate. It is read:

- directly, with the official ``openai`` SDK;
- through Spool, on an embedded stack whose model registry points Spool's ``openai`` provider at it
  (``loopback-50``, ``loopback-max``): a job created with ``POST /v1/jobs`` and read over Server-Sent
  Events, the WebSocket API and long-polling, and a streamed chat completion through Spool's
  OpenAI-compatible surface with the same SDK.

For 1 and 20 concurrent streams of 500 tokens at 50 tokens/s and of 1,000 tokens at full speed, it
prints the time to first token, the total time, the wall time of the whole batch and the gaps
between chunks (p50/p95), and Spool's figures as ratios to the direct ones, beside issue 16's
targets: Spool's own share of the time to first token <= 100 ms warm (the median of 15 short jobs
one after the other, against as many direct reads); 20 concurrent full-speed 1,000-token jobs within
4x the direct wall time; persist-to-client p95 <= 150 ms over SSE and WebSocket (a chunk held by
the client minus the ``created_at`` the worker stored with it), for streams read one at a time, as
the first token's share is, and for 20 streams started together. Those 20 start and end at the same
moment, so below their p95 it prints, for information, the p95 of the chunks written in the batch's
first and last two seconds and of those between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.readers import Held, Reader, tls
from spool.devstack import processes

WORDS = (" the", " of", " and", " to", " in", " is", " that", " for", " it", " with")  # one token each
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ROOT / "shared" / "spool_core" / "models.json"
SPOOL_TRANSPORTS = ("sse", "websocket", "poll", "openai")
TRANSPORT_NAMES = {
    "direct": "direct (openai SDK)",
    "sse": "Spool, SSE",
    "websocket": "Spool, WebSocket",
    "poll": "Spool, long-poll",
    "openai": "Spool, OpenAI-compatible",
}
# (tokens, tokens per second or 0 for full speed, Spool's model)
WORKLOADS = ((500, 50, "loopback-50"), (1000, 0, "loopback-max"))
CONCURRENCY = (1, 20)
SINGLE_REPEATS = 3
# Spool's share of the first token, warm: short jobs one after the other, enough for a steady median
# (three 10 s streams gave a median that moved by 30 ms from run to run).
FIRST_TOKEN = (16, 0, "loopback-max")
FIRST_TOKEN_SAMPLES = 15
# Streams started together begin and end together: the first and last seconds of such a batch, whose
# chunks' delays ``make bench`` prints apart from the rest.
PHASE_SECONDS = 2.0
STREAM_DEADLINE_SECONDS = 300.0  # a stream through Spool not done by then is reported as failed
SIDE_PARAMETERS = {"WorkerVisibilityTimeoutSeconds": "30"}  # as bench/__main__.py's stack


# ---------------------------------------------------------------------------------------- the upstream
def rate_of(model: str) -> float:
    """``loop-50`` -> 50 tokens/s; ``loop-0`` (or anything else) -> 0, as fast as possible."""
    _, _, rate = model.rpartition("-")
    try:
        return max(0.0, float(rate))
    except ValueError:
        return 0.0


def completion_chunk(index: int, model: str, created: int, **delta_or_usage: Any) -> bytes:
    """One ``chat.completion.chunk`` as an SSE ``data:`` line."""
    body: dict[str, Any] = {
        "id": f"chatcmpl-loop{index}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if "usage" in delta_or_usage:
        body["usage"] = delta_or_usage["usage"]
    else:
        body["choices"] = [
            {
                "index": 0,
                "delta": delta_or_usage.get("delta", {}),
                "finish_reason": delta_or_usage.get("finish"),
            }
        ]
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def upstream_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The loopback OpenAI-compatible server (ASGI): ``POST /v1/chat/completions`` with
    ``stream: true`` streams ``max_tokens`` one-token deltas at the model's rate, the first at once."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"error": {"message": "not found"}}'})
        return
    request = json.loads(body or b"{}")
    model = str(request.get("model", "loop-0"))
    tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
    rate = rate_of(model)
    created = int(time.time())
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await send(
        {
            "type": "http.response.body",
            "body": completion_chunk(0, model, created, delta={"role": "assistant", "content": ""}),
            "more_body": True,
        }
    )
    for i in range(tokens):
        if rate:
            await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
        else:
            await asyncio.sleep(0)  # let the other streams go on
        chunk = completion_chunk(i, model, created, delta={"content": WORDS[i % len(WORDS)]})
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    prompt = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
    tail = completion_chunk(tokens, model, created, delta={}, finish="length" if tokens else "stop")
    tail += completion_chunk(tokens, model, created, usage=usage) + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail, "more_body": False})


class Upstream:
    """The loopback server on 127.0.0.1 (a free port), served by uvicorn in a process of its own: the
    provider is neither the client nor Spool. On a thread of the bench's process, its 1,000 events a
    second (20 streams at 50 tokens/s) took the interpreter's lock from the readers, which then
    stamped the chunks they held late by the time they waited for it."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Upstream:
        fd = self._socket.fileno()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.side_by_side:upstream_app",
                "--fd",
                str(fd),
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "off",
                "--backlog",
                "256",
            ],
            pass_fds=(fd,),
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the loopback upstream did not start")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            processes.stop(self._process, timeout=5)
        self._socket.close()


def loopback_models(upstream_url: str, base: Path = DEFAULT_MODELS) -> dict[str, Any]:
    """The bundled registry plus two models served by the loopback upstream through Spool's ``openai``
    provider: ``loopback-50`` (50 tokens/s) and ``loopback-max`` (full speed)."""
    document: dict[str, Any] = json.loads(base.read_text())
    for model_id, upstream_model in (("loopback-50", "loop-50"), ("loopback-max", "loop-0")):
        document["models"].append(
            {
                "id": model_id,
                "provider": "openai",
                "provider_model_id": upstream_model,
                "family": "openai-o200k",
                "context_window": 128000,
                "max_output_tokens": 65536,
                "pricing": {"input_per_mtok": 0.0, "output_per_mtok": 0.0},
                "enabled": True,
                "options": {"base_url": upstream_url},
            }
        )
    return document


# ---------------------------------------------------------------------------------------- one stream
@dataclass
class Stream:
    """One stream's times (``time.time()``): when it was asked for, and when each chunk arrived."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    persist_delays: list[float] = field(default_factory=list)  # Spool: held minus created_at
    written: list[float] = field(default_factory=list)  # Spool: each of those chunks' created_at
    # Spool: what ``settle`` needs to fill ``persist_delays`` from the job's log once the batch is over
    # (base URL, API key, job id, and each chunk held: its sequence id and when it arrived).
    unsettled: tuple[str, str, str, list[tuple[int, float]]] | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.started

    @property
    def total(self) -> float:
        return self.arrivals[-1] - self.started

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def sdk_client(base_url: str, api_key: str, *, timeout: float) -> Any:
    """An ``openai`` client as a reader uses it: no retries, on the benchmarks' one TLS context."""
    import openai

    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultHttpxClient(verify=tls()),
    )


def read_direct(upstream_url: str, model: str, tokens: int) -> Stream:
    client = sdk_client(upstream_url, "loopback", timeout=300)
    try:
        return _openai_stream(client, model, tokens)
    finally:
        client.close()


def _openai_stream(client: Any, model: str, tokens: int) -> Stream:
    stream = Stream(time.time())
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "side by side"}], max_tokens=tokens, stream=True
    )
    for chunk in response:
        if any(choice.delta and choice.delta.content for choice in chunk.choices):
            stream.arrivals.append(time.time())
    return stream


def read_spool(base_url: str, api_key: str, transport: str, model: str, tokens: int) -> Stream:
    if transport == "openai":
        client = sdk_client(f"{base_url}/v1", api_key, timeout=600)
        try:
            return _openai_stream(client, model, tokens)
        finally:
            client.close()
    with Reader(base_url, api_key) as reader:
        stream = Stream(time.time())
        job = reader.create_job(message="side by side", model=model, max_tokens=tokens)
        try:
            held: list[Held] = list(reader.read(transport, job, within=STREAM_DEADLINE_SECONDS))
        except TimeoutError:
            reader.cancel(job["job_id"])  # its worker stops; the next batch starts from a drained queue
            raise
        stream.arrivals = [h.at for h in held]
        stream.unsettled = (base_url, api_key, job["job_id"], [(h.sequence_id, h.at) for h in held])
        return stream


def settle(streams: list[Stream]) -> None:
    """Each stream's persist-to-client delays, from its job's log (the ``created_at`` of each chunk),
    read once the whole batch is over: reading them as each stream ended put those reads beside the
    chunks the other streams of the batch were still being sent."""
    for stream in streams:
        if stream.unsettled is None:
            continue
        base_url, api_key, job_id, held = stream.unsettled
        with Reader(base_url, api_key) as reader:
            created = {c["sequence_id"]: epoch(c["created_at"]) for c in reader.chunk_log(job_id)}
        persisted = [(created[seq], at) for seq, at in held if seq in created]
        stream.written = [written for written, _ in persisted]
        stream.persist_delays = [at - written for written, at in persisted]
        stream.unsettled = None


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def concurrently(read: Callable[[], Stream], n: int) -> tuple[list[Stream], list[BaseException]]:
    """``n`` streams at once (threads), started together; a single stream is read
    ``SINGLE_REPEATS`` times one after the other (its percentiles are over those). Returns the
    streams that ended and the errors of those that did not."""
    if n == 1:
        streams: list[Stream] = []
        for _ in range(SINGLE_REPEATS):
            try:
                streams.append(read())
            except Exception as exc:
                return streams, [exc]
        return streams, []
    results: list[Stream | BaseException] = [RuntimeError("not run")] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = read()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,), name=f"stream-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    return [r for r in results if isinstance(r, Stream)], errors


def _drained(stack: Any, print_: Callable[[str], None], timeout: float = 180) -> None:
    from bench.jobs import wait_queue_drained

    try:
        wait_queue_drained(stack, timeout)
    except TimeoutError:
        print_(
            f"  (the jobs queue still held messages after {timeout:g} s; the next batch waits behind them)"
        )


def _batch(read: Callable[[], Stream], n: int) -> tuple[list[Stream], bool, list[BaseException]]:
    streams, errors = concurrently(read, n)
    settle(streams)
    return streams, n == 1, errors


# ---------------------------------------------------------------------------------------- figures
def quantile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank rule on the sorted values (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


@dataclass
class Row:
    transport: str
    streams: list[Stream]
    sequential: bool = False
    errors: list[BaseException] = field(default_factory=list)  # the streams that did not end

    @property
    def wall(self) -> float:
        """From the first request to the last chunk held, over the batch's concurrent streams (the
        median stream's total when they were read one after the other)."""
        if self.sequential:
            return self.total(0.5)
        return max(s.arrivals[-1] for s in self.streams) - min(s.started for s in self.streams)

    def ttft(self, q: float) -> float:
        return quantile([s.ttft for s in self.streams], q)

    def total(self, q: float) -> float:
        return quantile([s.total for s in self.streams], q)

    def gap(self, q: float) -> float:
        return quantile([g for s in self.streams for g in s.gaps], q)

    def persist(self, q: float) -> float:
        return quantile([d for s in self.streams for d in s.persist_delays], q)

    def chunks(self) -> float:
        return statistics.mean(len(s.arrivals) for s in self.streams)

    def persist_by_phase(self, edge: float = PHASE_SECONDS) -> dict[str, list[float]]:
        """The persist-to-client delays of streams started together, by when each chunk was written:
        in the batch's first ``edge`` seconds (every stream is admitted, picked up and subscribed at
        once), in its last ``edge`` seconds (every stream ends at once) and between."""
        written = [w for s in self.streams for w in s.written]
        if not written:
            return {}
        first, last = min(s.started for s in self.streams), max(written)
        phases: dict[str, list[float]] = {"first": [], "between": [], "last": []}
        for stream in self.streams:
            for at, delay in zip(stream.written, stream.persist_delays, strict=False):
                phase = "first" if at - first < edge else "last" if last - at < edge else "between"
                phases[phase].append(delay)
        return phases


def format_row(row: Row, direct: Row | None) -> str:
    label = f"  {TRANSPORT_NAMES[row.transport]:<26}"
    if not row.errors:
        return _figures(row, direct) if row.streams else f"{label} no stream"
    total = len(row.errors) + len(row.streams)
    failed = f"{len(row.errors)} of {total} streams failed, the first: {row.errors[0]!r}"
    return f"{_figures(row, direct)} | {failed}" if row.streams else f"{label} FAILED: {failed}"


def _figures(row: Row, direct: Row | None) -> str:
    ms = 1000
    text = (
        f"  {TRANSPORT_NAMES[row.transport]:<26}"
        f" TTFT p50 {row.ttft(0.5) * ms:6.0f} ms p95 {row.ttft(0.95) * ms:6.0f} ms"
        f" | total p50 {row.total(0.5):6.2f} s p95 {row.total(0.95):6.2f} s | wall {row.wall:6.2f} s"
        f" | gap p50 {row.gap(0.5) * ms:5.0f} ms p95 {row.gap(0.95) * ms:5.0f} ms ({row.chunks():.0f} chunks)"
    )
    if direct is not None and direct.streams:
        text += (
            f" | x direct: TTFT {row.ttft(0.5) / direct.ttft(0.5):5.1f}, wall {row.wall / direct.wall:4.1f}"
            f" | Spool's TTFT share {(row.ttft(0.5) - direct.ttft(0.5)) * ms:5.0f} ms"
        )
        if any(s.persist_delays for s in row.streams):
            p50, p95 = row.persist(0.5) * ms, row.persist(0.95) * ms
            text += f" | persist-to-client p50 {p50:4.0f} ms p95 {p95:4.0f} ms"
    return text


def verdicts(results: Mapping[tuple[int, int, str], Row]) -> list[str]:
    """Issue 16's targets, each with the figure that decides it."""
    out = []
    tokens = WORKLOADS[0][0]
    # The first token: from the short warm jobs when they ran, else from the single 500-token streams.
    first = FIRST_TOKEN[0] if (FIRST_TOKEN[0], 1, "direct") in results else tokens
    direct = results.get((first, 1, "direct"))
    for transport in SPOOL_TRANSPORTS:
        row = results.get((first, 1, transport))
        if direct is None or row is None or not direct.streams or not row.streams:
            continue
        share = (row.ttft(0.5) - direct.ttft(0.5)) * 1000
        label = f"Spool's own share of TTFT, warm, {TRANSPORT_NAMES[row.transport]}"
        if first != tokens:
            label += f" (median of {len(row.streams)} jobs)"
        out.append(_verdict(label, share, 100, "ms"))
    for transport in ("sse", "websocket"):  # one warm stream, and streams started together
        for concurrency in CONCURRENCY:
            row = results.get((tokens, concurrency, transport))
            if row is None or not row.streams:
                continue
            p95 = row.persist(0.95) * 1000
            streams = f"{len(row.streams)} streams" if concurrency > 1 else "1 stream at a time"
            out.append(
                _verdict(f"persist-to-client p95, {TRANSPORT_NAMES[transport]}, {streams}", p95, 150, "ms")
            )
            phases = row.persist_by_phase() if concurrency > 1 else {}
            if phases:
                out.append(_phases(phases))
    full_tokens = WORKLOADS[1][0]
    n = max(CONCURRENCY)
    direct = results.get((full_tokens, n, "direct"))
    for transport in SPOOL_TRANSPORTS:
        row = results.get((full_tokens, n, transport))
        if direct is None or row is None or not direct.streams or not row.streams:
            continue
        ratio = row.wall / direct.wall
        label = f"{n} concurrent full-speed {full_tokens:,}-token jobs, wall vs direct"
        label += f", {TRANSPORT_NAMES[transport]}"
        if row.errors:  # a stream that never ended has no wall time: the target is missed
            label += f" ({len(row.errors)} streams did not end)"
            ratio = math.inf
        out.append(_verdict(label, ratio, 4, "x"))
    return out


def _phases(phases: Mapping[str, list[float]]) -> str:
    """Where a batch's persist-to-client p95 comes from (information, not a target): its start and
    end, when all its streams do the same work at once, against the stretch between
    (``Row.persist_by_phase``)."""
    names = {
        "first": f"in its first {PHASE_SECONDS:g} s",
        "between": "between",
        "last": f"in its last {PHASE_SECONDS:g} s",
    }
    parts = [
        f"{names[phase]} p95 {quantile(delays, 0.95) * 1000:.0f} ms of {len(delays)}"
        for phase, delays in phases.items()
        if delays
    ]
    return f"    (information) the batch's chunks by when they were written: {'; '.join(parts)}"


def _verdict(label: str, value: float, target: float, unit: str) -> str:
    figure = f"{value:.0f} {unit}" if unit == "ms" else f"{value:.1f}{unit}"
    if math.isinf(value):
        figure = "not all ended"
    limit = f"{target:g} {unit}" if unit == "ms" else f"{target:g}{unit}"
    return f"  {label}: {figure} (target <= {limit}: {'meets' if value <= target else 'misses'})"


# ---------------------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_tokens(
    stack: Any,
    upstream: Upstream,
    transports: tuple[str, ...],
    results: dict[tuple[int, int, str], Row],
    print_: Callable[[str], None],
) -> None:
    """Spool's share of the first token: ``FIRST_TOKEN_SAMPLES`` short jobs one after the other on each
    path, against as many direct reads."""
    tokens, _, model = FIRST_TOKEN
    print_(f"the first token, warm: {FIRST_TOKEN_SAMPLES} jobs of {tokens} tokens one after the other:")

    def direct_read() -> Stream:
        return read_direct(upstream.base_url, "loop-0", tokens)

    direct = Row("direct", *_one_after_another(direct_read, FIRST_TOKEN_SAMPLES))
    results[(tokens, 1, "direct")] = direct
    print_(format_row(direct, None))
    for transport in transports:

        def spool(transport: str = transport) -> Stream:
            return read_spool(stack.base_url, stack.api_key, transport, model, tokens)

        _drained(stack, print_)
        row = Row(transport, *_one_after_another(spool, FIRST_TOKEN_SAMPLES))
        results[(tokens, 1, transport)] = row
        print_(format_row(row, direct))


def _one_after_another(read: Callable[[], Stream], n: int) -> tuple[list[Stream], bool, list[BaseException]]:
    """``n`` streams, one after the other."""
    streams: list[Stream] = []
    errors: list[BaseException] = []
    for _ in range(n):
        try:
            streams.append(read())
        except Exception as exc:
            errors.append(exc)
    settle(streams)
    return streams, True, errors


def run(
    workloads: tuple[tuple[int, int, str], ...] = WORKLOADS,
    concurrency: tuple[int, ...] = CONCURRENCY,
    transports: tuple[str, ...] = SPOOL_TRANSPORTS,
    print_: Callable[[str], None] = print,
    *,
    first_token: bool = True,
) -> dict[tuple[int, int, str], Row]:
    from spool.devstack.stack import EmbeddedStack

    print_("== side by side: one loopback OpenAI-compatible upstream, read directly and through Spool ==")
    results: dict[tuple[int, int, str], Row] = {}
    with Upstream() as upstream, tempfile.TemporaryDirectory(prefix="spool-side-") as scratch:
        models = Path(scratch, "models.json")
        models.write_text(json.dumps(loopback_models(upstream.base_url)))
        with (
            _environment({"SPOOL_MODELS_FILE": str(models)}),
            EmbeddedStack(port=0, ws_port=0, parameter_overrides=SIDE_PARAMETERS) as stack,
        ):
            print_(
                f"upstream {upstream.base_url}; embedded stack at {stack.base_url} ({stack.workers} workers)"
            )
            for transport in transports:  # warm: every function on each path has served a request
                read_spool(stack.base_url, stack.api_key, transport, FIRST_TOKEN[2], 8)
            read_direct(upstream.base_url, "loop-0", 8)
            if first_token:
                _first_tokens(stack, upstream, transports, results, print_)
            for tokens, rate, model in workloads:
                upstream_model = f"loop-{rate}"
                speed = f"{rate} tokens/s" if rate else "full speed"
                for n in concurrency:
                    batch = (
                        f"{n} concurrent streams"
                        if n > 1
                        else f"1 stream at a time ({SINGLE_REPEATS} in a row)"
                    )
                    print_(f"{tokens:,} tokens at {speed}, {batch}:")

                    def direct_read(model: str = upstream_model, tokens: int = tokens) -> Stream:
                        return read_direct(upstream.base_url, model, tokens)

                    direct = results[(tokens, n, "direct")] = Row("direct", *_batch(direct_read, n))
                    print_(format_row(direct, None))
                    for transport in transports:

                        def spool(
                            transport: str = transport, model: str = model, tokens: int = tokens
                        ) -> Stream:
                            return read_spool(stack.base_url, stack.api_key, transport, model, tokens)

                        _drained(stack, print_)  # no batch waits behind the last one's leftovers
                        row = results[(tokens, n, transport)] = Row(transport, *_batch(spool, n))
                        print_(format_row(row, direct))
    print_("targets (issue 16):")
    for line in verdicts(results):
        print_(line)
    print_("")
    return results
