"""Minimal clients of Spool's public contract (``/work/shared/DESIGN.md``) for the cost and
side-by-side benchmarks: create a job, then read it over Server-Sent Events, the WebSocket API or by
long-polling the chunk log, each chunk stamped with the time it was held. Every HTTP request to the
REST API, every WebSocket frame sent and the time a connection stays open are counted (what API
Gateway bills), which the Python client's retries and lookups would blur."""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import httpx2
from websockets.sync.client import connect as ws_connect

TRANSPORTS = ("sse", "websocket", "poll")


@cache
def tls() -> ssl.SSLContext:
    """The one TLS context of every HTTP client the benchmarks make (each would load the CA bundle,
    ~40 ms of CPU: 20 readers started together spent most of a second of the machine they measure
    on it, beside the stack under test). The stack is plain HTTP; the context is never used."""
    return httpx2.create_ssl_context()


@dataclass(frozen=True)
class Held:
    """A chunk as the reader got it: its sequence id, text and when it arrived (``time.time()``)."""

    sequence_id: int
    text: str
    at: float


class Reader:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.rest_requests = 0
        self.websocket_frames_sent = 0
        self.websocket_seconds = 0.0
        self._http = httpx2.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx2.Timeout(timeout, read=max(90.0, timeout)),
            event_hooks={"request": [self._count]},
            verify=tls(),
        )

    def _count(self, _: Any) -> None:
        self.rest_requests += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def create_job(self, **body: Any) -> dict[str, Any]:
        response = self._http.post("/v1/jobs", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        return job

    def chunk_log(self, job_id: str) -> list[dict[str, Any]]:
        """Every chunk of a job, with its ``created_at`` (not counted: read after the measurement)."""
        chunks: list[dict[str, Any]] = []
        with httpx2.Client(
            headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60, verify=tls()
        ) as http:
            while True:
                after = chunks[-1]["sequence_id"] if chunks else 0
                page = http.get(
                    f"{self.base_url}/v1/jobs/{job_id}/chunks", params={"after": after, "limit": 500}
                )
                page.raise_for_status()
                answer = page.json()
                chunks += answer["chunks"]
                if not answer["chunks"]:
                    return chunks

    def cancel(self, job_id: str) -> None:
        self._http.post(f"/v1/jobs/{job_id}/cancel")

    def read(self, transport: str, job: dict[str, Any], *, within: float = 600.0) -> Iterator[Held]:
        """Every chunk of ``job`` over ``transport``; ``TimeoutError`` if ``done`` has not come
        ``within`` seconds from now (checked at each chunk, ping or poll)."""
        deadline = time.monotonic() + within
        if transport == "sse":
            return self.events(job["job_id"], deadline)
        if transport == "poll":
            return self.poll(job["job_id"], deadline)
        if transport == "websocket":
            return self.subscribe(job["job_id"], job["links"]["subscribe"], deadline)
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")

    # ------------------------------------------------------------------ transports
    def events(self, job_id: str, deadline: float) -> Iterator[Held]:
        """``GET /v1/jobs/{id}/events``, reopened with ``Last-Event-ID`` if it ends before ``done``."""
        last = 0
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                response.raise_for_status()
                for event in httpx2.EventSource(response):
                    _check(deadline, job_id)
                    if event.event == "done":
                        return
                    if event.event == "chunk":
                        chunk: Any = event.json()
                        if chunk["sequence_id"] == last + 1:
                            last = chunk["sequence_id"]
                            yield Held(last, chunk["text"], time.time())

    def poll(self, job_id: str, deadline: float, wait: int = 20) -> Iterator[Held]:
        """``GET /v1/jobs/{id}/chunks?after=N&wait=S`` until ``done``."""
        last = 0
        while True:
            _check(deadline, job_id)
            response = self._http.get(
                f"/v1/jobs/{job_id}/chunks", params={"after": last, "wait": wait}, timeout=wait + 60
            )
            response.raise_for_status()
            page = response.json()
            at = time.time()
            for chunk in page["chunks"]:
                if chunk["sequence_id"] == last + 1:
                    last = chunk["sequence_id"]
                    yield Held(last, chunk["text"], at)
            if page["done"]:
                return

    def subscribe(self, job_id: str, url: str, deadline: float) -> Iterator[Held]:
        """One WebSocket connection, one subscribe frame, chunks until ``done``."""
        last = 0
        started = time.monotonic()
        try:
            with ws_connect(f"{url}?api_key={self.api_key}", open_timeout=30) as socket:
                socket.send(json.dumps({"action": "subscribe", "job_id": job_id, "after": 0}))
                self.websocket_frames_sent += 1
                while True:
                    _check(deadline, job_id)
                    message = json.loads(socket.recv(timeout=max(1.0, deadline - time.monotonic())))
                    if message.get("type") == "done":
                        return
                    if message.get("type") in ("error", None):  # Spool's error, or the gateway's
                        raise RuntimeError(f"subscription failed: {message}")
                    if message.get("type") == "chunk" and message["sequence_id"] == last + 1:
                        last = message["sequence_id"]
                        yield Held(last, message["text"], time.time())
        finally:
            self.websocket_seconds += time.monotonic() - started


def _check(deadline: float, job_id: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"job {job_id} was not done in time")
