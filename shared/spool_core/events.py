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
from typing import Any

from spool_core.errors import InvalidRequest
from spool_core.jobs.service import JobService

DONE_ID = "done"  # the done event's id: a browser reconnecting after it sends this, and gets 204
PING = ": ping\n\n"
MIN_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 0.1
RETRY_MS = 1000


@dataclass(frozen=True)
class StreamSettings:
    max_seconds: float = 840.0  # a stream ends (cleanly) before the function's time limit; clients resume
    ping_seconds: float = 15.0  # a comment at least this often keeps idle links open


def resume_point(last_event_id: str | None, after: str | None) -> int | None:
    """Where to start: ``Last-Event-ID`` wins over ``after``; None when the client already had ``done``."""
    raw = last_event_id if last_event_id not in (None, "") else after
    if raw == DONE_ID:
        return None
    if raw in (None, ""):
        return 0
    assert raw is not None
    if not raw.isdigit() or len(raw) > 18:
        field = "Last-Event-ID" if last_event_id not in (None, "") else "after"
        raise InvalidRequest(
            f"{field} must be the sequence id of the last event received (a non-negative integer)",
            details={"fields": [{"field": field, "value": raw[:40]}]},
            suggestions=["Resume with the id of the last event you received, or omit it to start at 1"],
        )
    return int(raw)


def chunk_event(chunk: dict[str, Any]) -> str:
    data = json.dumps({"sequence_id": chunk["sequence_id"], "text": chunk["text"]}, separators=(",", ":"))
    return f"id: {chunk['sequence_id']}\nevent: chunk\ndata: {data}\n\n"


def done_event(view: dict[str, Any]) -> str:
    data = {
        "job_id": view["job_id"],
        "status": view["status"],
        "usage": view["usage"],
        "cost_usd": view["cost_usd"],
        "error": view["error"],
        "last_sequence_id": view["progress"]["last_sequence_id"],
    }
    return f"id: {DONE_ID}\nevent: done\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Wait:
    """Nothing to send yet: the driver waits this long (``asyncio.sleep`` in the web app, so an idle
    stream holds no thread) and asks again."""

    seconds: float


def job_events(
    service: JobService,
    job_id: str,
    after: int,
    settings: StreamSettings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[str | Wait]:
    """The job's events after ``after``: the backlog, then live chunks as they are written, then
    ``done``. Ends early, cleanly, at ``max_seconds`` (the client reconnects with ``Last-Event-ID``).
    Yields text to send, or ``Wait`` when there is none yet."""
    settings = settings or StreamSettings()
    started = last_sent = clock()
    # The headers and a first byte go out at once (through every proxy); `retry` makes a browser
    # reconnect after one second instead of its default three.
    yield f"retry: {RETRY_MS}\n: connected\n\n"
    cursor, interval = after, MIN_POLL_SECONDS
    while True:
        page = service.chunks(job_id, after=cursor, limit=500)
        for chunk in page["chunks"]:
            yield chunk_event(chunk)
            cursor = chunk["sequence_id"]
        if page["done"]:
            yield done_event(service.view(service.get(job_id)))
            return
        now = clock()
        if now - started >= settings.max_seconds:
            return  # before the function's time limit: the client resumes where this stopped
        if page["chunks"]:
            last_sent, interval = now, MIN_POLL_SECONDS
            continue
        if now - last_sent >= settings.ping_seconds:
            yield PING
            last_sent = now
        yield Wait(interval)
        interval = min(interval * 1.5, MAX_POLL_SECONDS)


def texts(events: Iterator[str | Wait], sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Drive ``job_events`` synchronously (tests, tools): wait where it says, yield the text."""
    for item in events:
        if isinstance(item, Wait):
            sleep(item.seconds)
        else:
            yield item


# ---------------------------------------------------------------------------------------- links.events
class EventsToken:
    """A read-only credential for one job's event stream, for ``links.events``: it carries the tenant,
    the job and an expiry, signed with the deployment's secret (HMAC-SHA256). Never the API key."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, tenant_id: str, job_id: str, expires_at_s: int) -> str:
        payload = _b64(
            json.dumps({"t": tenant_id, "j": job_id, "e": expires_at_s}, separators=(",", ":")).encode()
        )
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now_s: float) -> tuple[str, str] | None:
        """(tenant id, job id), or None for a token that is forged, malformed or expired."""
        payload, _, signature = token.partition(".")
        try:
            valid = hmac.compare_digest(_unb64(signature), self._mac(payload))
            claims = json.loads(_unb64(payload)) if valid else None
        except (ValueError, TypeError):
            return None
        if not isinstance(claims, dict) or int(claims.get("e", 0)) < now_s:
            return None
        return str(claims["t"]), str(claims["j"])

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["DONE_ID", "EventsToken", "StreamSettings", "Wait", "job_events", "resume_point", "texts"]
