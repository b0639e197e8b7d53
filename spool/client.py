"""The Spool Python client: contexts from a directory, jobs with idempotency handled, and a
``stream()`` that resumes by itself after a dropped connection, with nothing lost or repeated.

    from spool import Client
    client = Client("http://127.0.0.1:8000", api_key="sk-local-dev")
    context = client.sync_directory("./src")
    job = client.create_job("Explain the worker", context_id=context["context_id"])
    for text in client.stream(job["job_id"]):
        print(text, end="")
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
import pathspec
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as ws_connect

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"completed", "failed", "cancelled"}


class SpoolError(Exception):
    """An error answer from Spool, with what it says: code, details, suggestions, request id."""

    def __init__(
        self, status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None
    ) -> None:
        error = (body or {}).get("error") or {}
        self.status = status
        self.code: str = error.get("code", "http_error")
        self.message: str = error.get("message", f"HTTP {status}")
        self.details: dict[str, Any] = error.get("details") or {}
        self.suggestions: list[str] = error.get("suggestions") or []
        self.request_id: str | None = error.get("request_id")
        self.headers = dict(headers or {})
        super().__init__(f"{self.code}: {self.message}")


class InvalidRequest(SpoolError):
    pass


class Unauthorized(SpoolError):
    pass


class NotFound(SpoolError):
    pass


class Conflict(SpoolError):
    pass


class Gone(SpoolError):
    pass


class RateLimited(SpoolError):
    @property
    def retry_after(self) -> float:
        return float(self.headers.get("Retry-After", "1"))


class ServerError(SpoolError):
    pass


_BY_STATUS: dict[int, type[SpoolError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: InvalidRequest,
    422: Conflict,
    429: RateLimited,
}


def _error(status: int, body: Any, headers: Mapping[str, str]) -> SpoolError:
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else SpoolError)
    return cls(status, body if isinstance(body, dict) else None, headers)


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SPOOL_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("SPOOL_API_KEY") or "sk-local-dev"
        self.timeout = timeout
        self.max_retries = max_retries
        self._sleep = sleep
        self._http: httpx2.Client | None = None

    def _streaming(self) -> httpx2.Client:
        """The connection pool for event streams (pings come every 15 s; reads allow for more)."""
        if self._http is None:
            self._http = httpx2.Client(timeout=httpx2.Timeout(self.timeout, read=max(60.0, self.timeout)))
        return self._http

    # ------------------------------------------------------------------ transport
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One call with retries: connection errors, 5xx and 429 (honouring Retry-After) are retried
        with exponential backoff and jitter; other errors raise their typed exception."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(method, path, body, headers, timeout)
            except (RateLimited, ServerError, ConnectionError, TimeoutError, urllib.error.URLError) as exc:
                if attempt == self.max_retries:
                    raise
                delay = exc.retry_after if isinstance(exc, RateLimited) else min(8.0, 0.25 * 2**attempt)
                self._sleep(delay * (1 + random.random() / 4))  # jitter
        raise AssertionError("unreachable")

    def _once(
        self, method: str, path: str, body: Any, headers: Mapping[str, str] | None, timeout: float | None
    ) -> tuple[int, dict[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310
        request.add_header("Authorization", f"Bearer {self.api_key}")
        request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:  # noqa: S310
                raw = response.read()
                status, answer_headers = response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = None
            raise _error(error.code, payload, dict(error.headers)) from None
        except http.client.HTTPException as exc:  # the connection broke mid-answer
            raise ConnectionError(f"incomplete answer: {exc!r}") from exc
        if status == 204:
            return status, answer_headers, None
        try:
            return status, answer_headers, json.loads(raw)
        except ValueError as exc:  # cut short: a retry asks again
            raise ConnectionError("incomplete answer body") from exc

    # ------------------------------------------------------------------ contexts
    def create_context(self, files: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        return self.request("POST", "/v1/contexts", {"files": files, **fields})[2]  # type: ignore[no-any-return]

    def get_context(self, context_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/contexts/{context_id}")[2]  # type: ignore[no-any-return]

    def patch_context(self, context_id: str, **changes: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/v1/contexts/{context_id}", changes)[2]  # type: ignore[no-any-return]

    def delete_context(self, context_id: str) -> None:
        self.request("DELETE", f"/v1/contexts/{context_id}")

    def sync_directory(self, directory: str | Path, *, ttl_seconds: int = 3600) -> dict[str, Any]:
        """Upload a directory as a context (honouring .gitignore, skipping binaries), or, when a local
        manifest says it was uploaded before and the context still lives, send only what changed."""
        root = Path(directory).resolve()
        files = read_directory(root)
        hashes = {path: _sha256(content) for path, content in files.items()}
        manifest_path = manifest_for(root)
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        summary: dict[str, Any] | None = None
        if previous and previous.get("base_url") == self.base_url:
            old: dict[str, str] = previous["files"]
            upsert = [{"path": p, "content": files[p]} for p, h in hashes.items() if old.get(p) != h]
            delete = [p for p in old if p not in hashes]
            try:
                summary = self.patch_context(
                    previous["context_id"], upsert=upsert, delete=delete, ttl_seconds=ttl_seconds
                )
            except (NotFound, Gone):
                summary = None  # expired or deleted: upload afresh
        if summary is None:
            summary = self.create_context(
                [{"path": p, "content": c} for p, c in files.items()], ttl_seconds=ttl_seconds
            )
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(
            json.dumps(
                {"base_url": self.base_url, "context_id": summary["context_id"], "files": hashes}, indent=1
            )
        )
        return summary

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
        key = idempotency_key or str(uuid.uuid4())
        body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        if messages is not None:
            body["messages"] = messages
        else:
            body["message"] = message
        try:
            return self.request("POST", "/v1/jobs", body, headers={"Idempotency-Key": key})[2]  # type: ignore[no-any-return]
        except Conflict as exc:
            if exc.code == "request_in_progress":  # our own earlier attempt got through
                return self.job(exc.details["job_id"])
            raise

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")[2]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")[2]  # type: ignore[no-any-return]

    def chunks(self, job_id: str, after: int = 0, *, limit: int = 500, wait: int = 0) -> dict[str, Any]:
        path = f"/v1/jobs/{job_id}/chunks?after={after}&limit={limit}&wait={wait}"
        return self.request("GET", path, timeout=wait + self.timeout)[2]  # type: ignore[no-any-return]

    def stream_chunks(self, job_id: str, after: int = 0, *, wait: int = 20) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after``, in order, as it arrives (long-poll). A dropped connection is
        retried from the last sequence id received: nothing is lost, nothing repeated."""
        last = after
        while True:
            page = self.chunks(job_id, last, wait=wait)
            for chunk in page["chunks"]:
                if chunk["sequence_id"] == last + 1:
                    last = chunk["sequence_id"]
                    yield chunk
            if page["done"]:
                return

    def subscribe(self, job_id: str, after: int = 0, *, url: str | None = None) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after`` over the WebSocket API, in order; reconnects after a dropped
        connection from the last sequence id received, so nothing is lost or repeated."""
        url = url or self.job(job_id)["links"]["subscribe"]
        if not url:
            raise ConnectionError("this deployment has no WebSocket URL")
        last, failures = after, 0
        while True:
            try:
                with ws_connect(f"{url}?api_key={self.api_key}", open_timeout=10) as socket:
                    socket.send(json.dumps({"action": "subscribe", "job_id": job_id, "after": last}))
                    while True:
                        message = json.loads(socket.recv(timeout=self.timeout + 30))
                        failures = 0
                        if message["type"] == "chunk":
                            if message["sequence_id"] == last + 1:  # a duplicate or a stale one is skipped
                                last = message["sequence_id"]
                                yield message
                        elif message["type"] == "done":
                            return
                        elif message["type"] == "error":
                            error = message["error"]
                            raise _error(404 if error["code"].endswith("not_found") else 400, message, {})
            except InvalidStatus as exc:
                if exc.response.status_code in (401, 403):
                    raise Unauthorized(exc.response.status_code, None) from exc
                failures += 1
                if failures > self.max_retries:
                    raise ConnectionError(f"the subscription kept failing: {exc}") from exc
                self._sleep(min(4.0, 0.2 * 2**failures))
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
                failures += 1
                if failures > self.max_retries:
                    raise ConnectionError(f"the subscription kept failing: {exc}") from exc
                self._sleep(min(4.0, 0.2 * 2**failures))

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every chunk after ``after`` over Server-Sent Events, in order. A stream that ends before
        ``done`` (its time limit) or breaks off (the network) is reopened with ``Last-Event-ID``: nothing
        is lost or repeated."""
        last, failures = after, 0
        url = f"{self.base_url}/v1/jobs/{job_id}/events"
        while True:
            headers = {
                "Authorization": f"Bearer {self.api_key}",
                "Accept": "text/event-stream",
                "Last-Event-ID": str(last),
            }
            try:
                with self._streaming().stream("GET", url, headers=headers) as response:
                    if response.status_code >= 400:
                        raise _error(
                            response.status_code, _json_or_none(response.read()), dict(response.headers)
                        )
                    for event in httpx2.EventSource(response):
                        failures = 0
                        if event.event == "chunk":
                            chunk: dict[str, Any] = event.json()  # type: ignore[assignment]
                            if chunk["sequence_id"] == last + 1:
                                last = chunk["sequence_id"]
                                yield chunk
                        elif event.event == "done":
                            return
                continue  # ended before `done` (the stream's time limit): reopen where it stopped
            except (RateLimited, ServerError, httpx2.TransportError, httpx2.SSEError) as exc:
                failures += 1
                if failures > self.max_retries:
                    raise ConnectionError(f"the event stream kept failing: {exc}") from exc
                self._sleep(exc.retry_after if isinstance(exc, RateLimited) else min(4.0, 0.2 * 2**failures))

    def stream(self, job_id: str, after: int = 0, *, transport: str = "sse") -> Iterator[str]:
        """The job's text as it is generated: over Server-Sent Events (``sse``, the default), the
        WebSocket API (``websocket``) or by long-polling the chunk log (``poll``). Each resumes by
        itself after a dropped connection."""
        if transport == "sse":
            chunks = self.events(job_id, after)
        elif transport == "websocket":
            chunks = self.subscribe(job_id, after)
        elif transport == "poll":
            chunks = self.stream_chunks(job_id, after)
        else:
            raise ValueError(f"transport must be sse, websocket or poll, not {transport!r}")
        for chunk in chunks:
            yield chunk["text"]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def manifest_for(root: Path) -> Path:
    """Where the hashes of a directory's last upload are kept (outside the directory itself)."""
    cache = Path(os.environ.get("SPOOL_CACHE_DIR") or Path.home() / ".cache" / "spool")
    return cache / "contexts" / f"{_sha256(str(root))[:24]}.json"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_directory(root: Path, *, max_file_bytes: int = 1_000_000) -> dict[str, str]:
    """Text files under ``root`` by relative path: .gitignore'd, hidden VCS folders and binaries skipped."""
    ignore_file = root / ".gitignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines([*lines, ".git/", "__pycache__/", ".venv/"])
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or spec.match_file(relative) or path.stat().st_size > max_file_bytes:
            continue
        data = path.read_bytes()
        if b"\x00" in data[:8192]:
            continue  # binary
        try:
            files[relative] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files
