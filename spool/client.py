"""The Spool Python client: contexts from a directory, jobs with idempotency handled, and a
``stream()`` that resumes by itself after a dropped connection, with nothing lost or repeated, and
that raises ``JobFailed`` / ``JobCancelled`` when the job did not complete.

    from spool import Client
    client = Client("http://127.0.0.1:8000", api_key="sk-local-dev")
    context = client.sync_directory("./src")
    job = client.create_job("Explain the worker", context_id=context["context_id"])
    stream = client.stream(job["job_id"])
    for text in stream:
        print(text, end="")
    print(stream.result["usage"], stream.result["cost_usd"])

``AsyncClient`` (in ``spool.aio``) has the same surface with async methods.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect as ws_connect

from spool import _core
from spool._core import DEFAULT_URL, TERMINAL, Call, ClientBase, Steps, StreamState, T
from spool.aio import AsyncClient, AsyncJobStream
from spool.errors import (
    Conflict,
    ConnectionFailed,
    Gone,
    InvalidRequest,
    JobCancelled,
    JobEnded,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    SpoolError,
    SyncError,
    Unauthorized,
)
from spool.sync import Progress, load_manifest, manifest_for, read_directory, snapshot

ProgressCallback = Callable[[dict[str, Any]], None]


class JobStream(StreamState):
    """The text of a job as it is generated (an iterator of ``str``), resumed by itself after a
    dropped connection. ``last_sequence_id``, ``tokens`` and ``chunks`` grow as it goes; at the end
    ``result`` holds ``job_id``, ``status``, ``usage``, ``cost_usd`` and ``error``. A job that ended
    ``failed`` or ``cancelled`` raises ``JobFailed`` / ``JobCancelled`` after its last chunk."""

    def __init__(
        self, client: Client, job_id: str, after: int, transport: str, on_progress: ProgressCallback | None
    ) -> None:
        super().__init__(job_id, after, on_progress)
        self.transport = transport
        self._texts = client._texts(self, transport)

    def __iter__(self) -> JobStream:
        return self

    def __next__(self) -> str:
        return next(self._texts)

    def close(self) -> None:
        """Stop reading (closes the connection)."""
        self._texts.close()

    def __enter__(self) -> JobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(ClientBase):
    """One keep-alive ``httpx2.Client`` to Spool. Retries connection errors, 5xx and short 429s at
    most ``max_retries`` times, each wait at most ``max_retry_wait`` seconds; a 429 asking for longer,
    or ``budget_exceeded``, is raised at once."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 2,
        max_retry_wait: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
        http_transport: httpx2.BaseTransport | None = None,
        direct_upload_limit: int | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait, direct_upload_limit)
        self._sleep = sleep
        self._http = httpx2.Client(transport=http_transport, **self.settings.http_options())

    # ------------------------------------------------------------------ transport
    def _exchange(self, call: Call) -> tuple[httpx2.Response, Any]:
        """One call, retried as the policy says; the answer and its JSON body, or the typed error."""
        attempt = 0
        while True:
            try:
                response = self._send(call)
                return response, _core.answer(call, response)
            except _core.RETRYABLE as error:
                attempt = self._wait_or_raise(attempt, error)

    def _send(self, call: Call) -> httpx2.Response:
        content = call.chunks() if call.progress is not None else call.body
        request = self._http.build_request(content=content, **call.request_args(self.settings))
        try:
            return self._http.send(request)
        except httpx2.TransportError as exc:
            raise _core.unreachable(self.settings, call, exc) from exc

    def _wait_or_raise(self, attempt: int, error: SpoolError) -> int:
        delay = self.retry.delay(attempt, error)
        if delay is None:
            raise error.after(attempt + 1) if isinstance(error, ConnectionFailed) else error
        self._sleep(delay)
        return attempt + 1

    def _call(self, call: Call) -> Any:
        return self.seen(self._exchange(call)[1])

    def _drive(self, steps: Steps[T]) -> T:
        """Run shared steps (``spool._core``): send each call, hand back its answer or its error."""
        driver = _core.Driver(steps)
        while (call := driver.next()) is not None:
            try:
                driver.answer(self._call(call))
            except SpoolError as error:
                driver.fail(error)
        return driver.result

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Any call to the API, with the client's retries: status, headers and JSON body."""
        response, answer = self._exchange(Call(method, path, json=body, headers=headers, timeout=timeout))
        return response.status_code, dict(response.headers), answer

    # ------------------------------------------------------------------ contexts
    def create_context(self, files: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        return self._call(Call("POST", "/v1/contexts", json={"files": files, **fields}))  # type: ignore[no-any-return]

    def get_context(self, context_id: str) -> dict[str, Any]:
        return self._call(Call("GET", f"/v1/contexts/{_core.segment(context_id)}"))  # type: ignore[no-any-return]

    def patch_context(self, context_id: str, **changes: Any) -> dict[str, Any]:
        return self._call(Call("PATCH", f"/v1/contexts/{_core.segment(context_id)}", json=changes))  # type: ignore[no-any-return]

    def delete_context(self, context_id: str) -> None:
        self._call(Call("DELETE", f"/v1/contexts/{_core.segment(context_id)}"))

    def list_contexts(self, *, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        return self._call(_core.list_call("contexts", limit, cursor))  # type: ignore[no-any-return]

    def iter_contexts(self, *, page_size: int = 50) -> Iterator[dict[str, Any]]:
        return self._pages(lambda cursor: _core.list_call("contexts", page_size, cursor))

    def sync_directory(
        self, directory: str | Path, *, ttl_seconds: int = 3600, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Upload a directory as a context (honouring .gitignore; binary, too large and non-UTF-8
        files skipped and listed in ``skipped``), or, when this directory was synced to this server
        before and the context still lives, send only what changed (nothing at all when nothing
        did: ``changed`` is False). A document above the direct limit goes through a presigned
        upload (``uploaded_via``). Raises ``SyncError`` for a missing, non-directory or empty path."""
        snap = snapshot(directory, progress=progress)
        path = manifest_for(snap.root, self.base_url, self.api_key)
        steps = _core.sync_steps(snap, load_manifest(path), path, self.settings, ttl_seconds, progress)
        return self._drive(steps)

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        message: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Create a job. The idempotency key is generated once and reused by every retry of this call,
        so a retry after a lost answer never starts a second generation."""
        body = _core.job_body(message, messages, fields)
        return self._drive(_core.create_job_steps(body, idempotency_key))

    def job(self, job_id: str, *, output: bool = True) -> dict[str, Any]:
        """The job resource; ``output=False`` leaves the output out (small, for status polls)."""
        return self._call(_core.job_call(job_id, output=output))  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call(Call("POST", f"/v1/jobs/{_core.segment(job_id)}/cancel"))  # type: ignore[no-any-return]

    def list_jobs(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        return self._call(_core.list_call("jobs", limit, cursor, status))  # type: ignore[no-any-return]

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        return self._pages(lambda cursor: _core.list_call("jobs", page_size, cursor, status))

    def _pages(self, page: Callable[[str | None], Call]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            answer = self._call(page(cursor))
            yield from answer["data"]
            if not (cursor := answer.get("next_cursor")):
                return

    def models(self) -> dict[str, Any]:
        return self._call(Call("GET", "/v1/models"))  # type: ignore[no-any-return]

    def usage(self, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        return self._call(_core.usage_call(since, until))  # type: ignore[no-any-return]

    def health(self, deep: bool = False) -> dict[str, Any]:
        """The health report; a 503 (Spool down) is returned with its report, not raised."""
        return self._call(_core.health_call(deep))  # type: ignore[no-any-return]

    def chunks(self, job_id: str, after: int = 0, *, limit: int = 500, wait: int = 0) -> dict[str, Any]:
        return self._call(_core.chunks_call(job_id, after, limit, wait, self.timeout))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ streams
    def stream(
        self,
        job_id: str,
        after: int = 0,
        *,
        transport: str = "sse",
        on_progress: ProgressCallback | None = None,
    ) -> JobStream:
        """The job's text as it is generated: over Server-Sent Events (``sse``, the default), the
        WebSocket API (``websocket``) or by long-polling the chunk log (``poll``). Each resumes by
        itself after a dropped connection."""
        _core.check_transport(transport)
        return JobStream(self, job_id, after, transport, on_progress)

    def _texts(self, state: StreamState, transport: str) -> Generator[str]:
        for chunk in self._chunks_of(state, transport):
            yield chunk["text"]
        summary = state.summary_call()
        state.finish(self._call(summary) if summary is not None else None)

    def _chunks_of(self, state: StreamState, transport: str) -> Iterator[dict[str, Any]]:
        if transport == "websocket":
            return self._websocket(state)
        return self._poll(state) if transport == "poll" else self._events(state)

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after`` over Server-Sent Events, in order (ends at ``done``, whatever
        the job's status: ``stream()`` is what raises for a failed job)."""
        return self._events(StreamState(job_id, after))

    def subscribe(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after`` over the WebSocket API, in order."""
        return self._websocket(StreamState(job_id, after))

    def stream_chunks(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after`` by long-polling the chunk log, in order."""
        return self._poll(StreamState(job_id, after))

    def _events(self, state: StreamState) -> Iterator[dict[str, Any]]:
        """A stream that ends before ``done`` (its time limit) or breaks off (the network) is reopened
        with ``Last-Event-ID``: nothing is lost or repeated."""
        failures = 0
        while not state.ended:
            headers = self.settings.events_headers(state.last_sequence_id)
            timeout = self.settings.stream_timeout()
            try:
                with self._http.stream(
                    "GET", state.events_path(), headers=headers, timeout=timeout
                ) as response:
                    _core.raise_for_stream(response, response.read() if response.status_code >= 400 else b"")
                    for event in httpx2.EventSource(response):
                        failures = 0
                        if (chunk := state.on_sse(event)) is not None:
                            yield chunk
            except httpx2.TransportError as exc:
                failures = self._wait_or_raise(failures, _core.broken(self.base_url, exc))
            except _core.RETRYABLE as error:
                failures = self._wait_or_raise(failures, error)

    def _websocket(self, state: StreamState) -> Iterator[dict[str, Any]]:
        """A dropped connection reconnects from the last sequence id received. The link is the one
        the client remembers (``subscribe_url``); read from the job when it has none, or when the one
        it remembers cannot be reached (the stack restarted on another port)."""
        url, remembered = self.subscribe_url, True
        if not url:
            url, remembered = self._subscribe_link(state.job_id), False
        failures = 0
        while not state.ended:
            try:
                with ws_connect(self.settings.websocket_url(url), open_timeout=10) as socket:
                    remembered = False  # it answers: keep it
                    socket.send(state.subscribe_message())
                    while not state.ended:
                        try:
                            message = json.loads(socket.recv(timeout=self.timeout + _core.QUIET_SECONDS))
                        except TimeoutError:
                            break  # quiet, not broken: subscribe again, and count no failure
                        failures = 0
                        if (chunk := state.on_websocket(message)) is not None:
                            yield chunk
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
                failure = _core.websocket_failed(url, exc)
                if _core.link_gone(remembered, failure):
                    url, remembered = self._subscribe_link(state.job_id), False
                    continue
                failures = self._wait_or_raise(failures, failure)

    def _subscribe_link(self, job_id: str) -> str:
        """The job's link, read again: its answer is ``seen``, which remembers the link."""
        self.subscribe_url = None
        self.job(job_id, output=False)
        return self.remembered_link()

    def _poll(self, state: StreamState) -> Iterator[dict[str, Any]]:
        """Long-polls the chunk log; each page is one call with the client's retries."""
        while not state.ended:
            yield from state.on_page(self._call(state.page_call(self.timeout)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEFAULT_URL",
    "TERMINAL",
    "AsyncClient",
    "AsyncJobStream",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Gone",
    "InvalidRequest",
    "JobCancelled",
    "JobEnded",
    "JobFailed",
    "JobStream",
    "NotFound",
    "RateLimited",
    "ServerError",
    "SpoolError",
    "SyncError",
    "Unauthorized",
    "manifest_for",
    "read_directory",
]
