"""Server-Sent Events over the chunk log: one event per chunk (``id:`` is its sequence id, so a browser's
EventSource resumes by itself with ``Last-Event-ID``), then ``done``, then the stream closes.

The stream is a plain generator of text: the streaming function's web app sends it as it comes (AWS
Lambda Web Adapter on AWS, the stack's gateway locally), and the OpenAI-compatible streams are built
on the same reading of the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from spool_core.clock import epoch_ms
from spool_core.errors import InvalidRequest
from spool_core.jobs.cadence import Watch
from spool_core.jobs.model import MAX_SEQUENCE_ID, EndMark, Job
from spool_core.units import now_ms, usd

if TYPE_CHECKING:  # the fanout builds ``done`` here without loading the job service
    from spool_core.jobs.cadence import Cadence
    from spool_core.jobs.pages import ChunkPage
    from spool_core.settings import Settings

DONE_ID = "done"  # the done event's id: a browser reconnecting after it sends this, and gets 204
PING = ": ping\n\n"
# A ping is sent this much before ``ping_seconds`` is up (a tenth of it at most), before the log's read:
# "at least every 15 s" holds however late a wake-up or however slow a read (15.01-15.02 s apart when
# the ping waited for the read that followed the wake-up).
PING_EARLY_SECONDS = 1.0
MIN_POLL_SECONDS = 0.05
PAGE = 500
RETRY_MS = 1000


class JobLog(Protocol):
    """What a stream reads: the job's log a page at a time, and the job at its end
    (``spool_core.jobs.pages.ChunkPages``, or the job service, which reads its log through one)."""

    @property
    def cadence(self) -> Cadence: ...

    def chunk_page(self, job_id: str, after: int = 0, limit: int = ..., wait: float = 0) -> ChunkPage: ...

    def get(self, job_id: str) -> Job: ...


@dataclass(frozen=True)
class StreamSettings:
    max_seconds: float = 840.0  # a stream ends (cleanly) before the function's time limit; clients resume
    ping_seconds: float = 15.0  # a comment at least this often keeps idle links open
    # A non-streamed answer waits for the job this long (also within the function's time limit); it
    # has no resume, so it is not cut short where streams are (locally, to exercise reconnects). It
    # answers before the OpenAI SDKs' default timeout (600 s): an SDK that gave up first would send
    # the request again without an Idempotency-Key, a new paid job, where the 504 tells it not to.
    answer_max_seconds: float = 270.0
    # How often a stream asks whether the key it was opened with is still active (``follow``'s
    # ``allowed``, answered from the key cache: one read per cache period, SPOOL_AUTH_CACHE_SECONDS).
    access_seconds: float = 5.0

    @classmethod
    def of(cls, config: Settings) -> StreamSettings:
        return cls(
            max_seconds=config.stream_max_seconds,
            ping_seconds=config.stream_ping_seconds,
            answer_max_seconds=config.answer_max_seconds,
        )


def resume_point(last_event_id: str | None, after: str | None) -> int | None:
    """Where to start: ``Last-Event-ID`` wins over ``after``; None when the client already had ``done``."""
    raw = last_event_id if last_event_id not in (None, "") else after
    if raw == DONE_ID:
        return None
    if raw in (None, ""):
        return 0
    assert raw is not None
    cursor = parse_cursor(raw)
    if cursor is None:
        field = "Last-Event-ID" if last_event_id not in (None, "") else "after"
        raise InvalidRequest(
            f"{field} must be the sequence id of the last event received (an integer 0..{MAX_SEQUENCE_ID})",
            details={"fields": [{"field": field, "value": raw[:40]}]},
            suggestions=["Resume with the id of the last event you received, or omit it to start at 1"],
        )
    return cursor


def parse_cursor(raw: str) -> int | None:
    """A sequence number as a client sends it back (ASCII digits, 0..MAX_SEQUENCE_ID), else None."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_SEQUENCE_ID)):
        return None
    value = int(raw)
    return value if value <= MAX_SEQUENCE_ID else None


def chunk_event(chunk: dict[str, Any]) -> str:
    data = json.dumps({"sequence_id": chunk["sequence_id"], "text": chunk["text"]}, separators=(",", ":"))
    return f"id: {chunk['sequence_id']}\nevent: chunk\ndata: {data}\n\n"


def done_data(ended: Job | EndMark) -> dict[str, Any]:
    """What ``done`` carries on every transport (the SSE event's data, the WebSocket message): how the
    job ended, from the ended job item or its end mark alone (progress, usage and cost are final)."""
    mark = ended if isinstance(ended, EndMark) else EndMark.of(ended)
    return {
        "job_id": mark.job_id,
        "status": mark.status,
        "usage": mark.usage.model_dump(),
        "cost_usd": usd(mark.cost_nanos),
        "error": mark.error,
        "last_sequence_id": mark.last_sequence_id,
    }


def done_event(job: Job) -> str:
    data = json.dumps(done_data(job), separators=(",", ":"))
    return f"id: {DONE_ID}\nevent: done\ndata: {data}\n\n"


@dataclass(frozen=True)
class Wait:
    """Nothing to send yet: the driver waits this long (``asyncio.sleep`` in the web app, so an idle
    stream holds no thread) and asks again."""

    seconds: float


@dataclass(frozen=True)
class Ping:
    """Time to send a keep-alive: nothing was sent for almost ``ping_seconds``."""


@dataclass(frozen=True)
class Ended:
    """The job is over and every chunk of it was followed."""

    job: Job


@dataclass(frozen=True)
class TimeUp:
    """The stream's time is up before the job ended: the client resumes from its last chunk."""


@dataclass(frozen=True)
class Revoked:
    """The key the stream was opened with is no longer active (revoked or expired): the stream ends,
    and a reconnect is refused (401) as any request with that key is."""


Followed = dict[str, Any] | Wait | Ping | Ended | TimeUp | Revoked


def follow(
    service: JobLog,
    job_id: str,
    after: int,
    settings: StreamSettings | None = None,
    *,
    budget: int | None = None,
    allowed: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_ms: Callable[[], int] = now_ms,
) -> Iterator[Followed]:
    """The job's chunks after ``after`` as the log has them (the backlog, then live as they are
    written), with ``Wait`` between reads, ``Ping`` when the link has been idle, and ``Ended`` (or
    ``TimeUp`` at ``max_seconds``) last. Every stream format (native SSE, OpenAI's) reads this.
    ``budget``: the job's ``max_tokens`` (its last chunk is then expected when it is due).
    ``allowed``: whether the stream's credential is still good, asked every ``access_seconds``;
    when it is not, ``Revoked`` comes last (a stream must not outlive its revoked key)."""
    settings = settings or StreamSettings()
    watch = Watch(service.cadence, budget)  # look for the next chunk when it is due
    ping_due = settings.ping_seconds - min(PING_EARLY_SECONDS, settings.ping_seconds / 10)
    started = last_sent = checked = clock()
    cursor = after
    while True:
        if allowed is not None and clock() - checked >= settings.access_seconds:
            checked = clock()
            if not allowed():
                yield Revoked()
                return
        if clock() - last_sent >= ping_due:
            yield Ping()
            last_sent = clock()
        page = service.chunk_page(job_id, after=cursor, limit=PAGE)
        for chunk in page.chunks:
            yield chunk.public()
            cursor = chunk.sequence_id
            watch.saw(cursor, epoch_ms(chunk.created_at), chunk.tokens, chunk.tokens_total)
        if page.done:
            yield Ended(service.get(job_id))
            return
        now = clock()
        if now - started >= settings.max_seconds:
            yield TimeUp()  # before the function's time limit: the client resumes where this stopped
            return
        if page.chunks:
            last_sent = now
            if len(page.chunks) == PAGE:
                continue  # more of the backlog
        wait = watch.wait_ms(wall_ms()) / 1000  # never past the time limit, nor a ping that is due
        until_ping = ping_due - (now - last_sent)
        until_check = settings.access_seconds - (now - checked) if allowed is not None else until_ping
        yield Wait(max(0.0, min(wait, started + settings.max_seconds - now, until_ping, until_check)))


def await_end(
    service: JobLog,
    job_id: str,
    settings: StreamSettings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Wait | Ended | TimeUp]:
    """Wait for the job to end (a non-streamed answer): one read of the job per poll, backing off to
    half a second; ``Ended`` with the ended job, or ``TimeUp`` at ``answer_max_seconds``."""
    settings = settings or StreamSettings()
    started, interval = clock(), MIN_POLL_SECONDS
    while True:
        job = service.get(job_id)
        if job.terminal:
            yield Ended(job)
            return
        if clock() - started >= settings.answer_max_seconds:
            yield TimeUp()
            return
        yield Wait(interval)
        interval = min(interval * 1.5, 0.5)


def job_events(
    service: JobLog,
    job_id: str,
    after: int,
    settings: StreamSettings | None = None,
    *,
    budget: int | None = None,
    allowed: Callable[[], bool] | None = None,
    request_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_ms: Callable[[], int] = now_ms,
) -> Iterator[str | Wait]:
    """The native stream: the job's events after ``after``, then ``done``; ends early, cleanly, at
    ``max_seconds`` (the client reconnects with ``Last-Event-ID``), or when the key it was opened
    with stops being active (``allowed``): then an ``error`` event in Spool's envelope says so (a
    browser's EventSource would otherwise reconnect, unknowing, until its reconnect is refused), and
    the reconnect is refused with 401. Yields text to send, or ``Wait``."""
    # The headers and a first byte go out at once (through every proxy); `retry` makes a browser
    # reconnect after one second instead of its default three.
    yield f"retry: {RETRY_MS}\n: connected\n\n"
    followed = follow(
        service, job_id, after, settings, budget=budget, allowed=allowed, clock=clock, wall_ms=wall_ms
    )
    last = after
    for item in followed:  # TimeUp and Revoked end it without `done`
        if isinstance(item, dict):
            last = item["sequence_id"]
            yield chunk_event(item)
        elif isinstance(item, Ping):
            yield PING
        elif isinstance(item, Ended):
            yield done_event(item.job)
        elif isinstance(item, Revoked):
            yield revoked_event(job_id, last, request_id)
        elif isinstance(item, Wait):
            yield item


def revoked_event(job_id: str, last_sequence_id: int, request_id: str | None) -> str:
    """The stream's key was revoked (or expired) while it ran: why it ends, and how to read the rest.
    No ``id``: a reconnect resumes after the last chunk."""
    from spool_core.api.errors import envelope  # loaded by the stream's web app already
    from spool_core.auth import revoked_key_error  # loaded by the stream's key check already

    resume = (
        f"read the rest with an active key's links.events (GET /v1/jobs/{job_id}),"
        f" with 'Last-Event-ID: {last_sequence_id}'"
    )
    error = revoked_key_error(job_id, last_sequence_id, resume)
    data = json.dumps(envelope(error, request_id), separators=(",", ":"))
    return f"event: error\ndata: {data}\n\n"


def texts(events: Iterator[str | Wait], sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Drive ``job_events`` synchronously (tests, tools): wait where it says, yield the text."""
    for item in events:
        if isinstance(item, Wait):
            sleep(item.seconds)
        else:
            yield item


# ---------------------------------------------------------------------------------------- links.events
class EventsClaims(NamedTuple):
    tenant_id: str
    job_id: str
    key_id: str | None  # the API key it was handed to (None: a token made before tokens named one)


class EventsToken:
    """A read-only credential for one job's event stream, for ``links.events``: it carries the tenant,
    the job, the id of the API key it was handed to (a revoked key's tokens stop working with it) and
    an expiry, signed with the deployment's secret (HMAC-SHA256). Never the API key."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, tenant_id: str, job_id: str, expires_at_s: int, key_id: str | None = None) -> str:
        claims: dict[str, Any] = {"t": tenant_id, "j": job_id, "e": expires_at_s}
        if key_id is not None:
            claims["k"] = key_id
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now_s: float) -> EventsClaims | None:
        """What a token says, or None for a token that is forged, malformed or expired."""
        payload, _, signature = token.partition(".")
        try:
            valid = hmac.compare_digest(_unb64(signature), self._mac(payload))
            claims = json.loads(_unb64(payload)) if valid else None
        except (ValueError, TypeError):
            return None
        if not isinstance(claims, dict) or int(claims.get("e", 0)) < now_s:
            return None
        key_id = claims.get("k")
        return EventsClaims(str(claims["t"]), str(claims["j"]), str(key_id) if key_id is not None else None)

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = [
    "DONE_ID",
    "Ended",
    "EventsToken",
    "Ping",
    "StreamSettings",
    "TimeUp",
    "Wait",
    "await_end",
    "done_data",
    "done_event",
    "follow",
    "job_events",
    "resume_point",
    "texts",
]
