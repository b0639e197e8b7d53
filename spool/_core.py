"""What the sync and async clients share, with no I/O of its own: the calls (method, path, body),
how an answer becomes a value or a typed error, when a failure is retried and after how long, a
stream's state (chunks in order, the ending as a result or a ``JobFailed``/``JobCancelled``), and
the steps of creating a job and syncing a directory, written once as generators of calls that
each client drives with its own transport."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx2
from websockets.exceptions import InvalidStatus

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
    error_for,
)
from spool.sync import (
    DIRECT_UPLOAD_LIMIT,
    Progress,
    Snapshot,
    SyncPlan,
    encode,
    plan_create,
    plan_sync,
    save_manifest,
)

# A WebSocket with no message for the client's timeout and this long is asked again (a new connection,
# the same subscribe): the job may only be queued or slow to its first token, so that is no failure.
QUIET_SECONDS = 30.0


def segment(value: object) -> str:
    """An id as one segment of a path: ``../contexts`` or ``job_x?output=false`` names nothing else
    (and ``..`` alone is not a step up, which an HTTP client would resolve before sending)."""
    text = quote(str(value), safe="")
    return text.replace(".", "%2E") if text in {".", ".."} else text


DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_KEY = "sk-local-dev"
TERMINAL = {"completed", "failed", "cancelled"}
TRANSPORTS = ("sse", "websocket", "poll")
UPLOAD_CHUNK_BYTES = 256 * 1024
# A 429 with one of these codes is about a budget (a day's, an hour's): waiting in a client would
# block its caller for hours, so it is raised at once whatever Retry-After says.
NEVER_RETRIED = frozenset({"budget_exceeded"})
RETRYABLE: tuple[type[SpoolError], ...] = (RateLimited, ServerError, ConnectionFailed)

T = TypeVar("T")


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Settings:
    base_url: str
    api_key: str
    timeout: float
    direct_upload_limit: int

    @classmethod
    def resolve(
        cls, base_url: str | None, api_key: str | None, timeout: float, direct_upload_limit: int | None
    ) -> Settings:
        """Arguments first, then ``SPOOL_URL`` / ``SPOOL_API_KEY``, then the local stack's defaults."""
        return cls(
            (base_url or os.environ.get("SPOOL_URL") or DEFAULT_URL).rstrip("/"),
            api_key or os.environ.get("SPOOL_API_KEY") or DEFAULT_KEY,
            timeout,
            direct_upload_limit or DIRECT_UPLOAD_LIMIT,
        )

    def http_options(self) -> dict[str, Any]:
        """What both httpx2 clients are built with (keep-alive pools, Spool's base URL)."""
        return {"base_url": self.base_url, "timeout": httpx2.Timeout(self.timeout)}

    def stream_timeout(self) -> httpx2.Timeout:
        """Event streams send a ping every 15 s; reads allow for more."""
        return httpx2.Timeout(self.timeout, read=max(60.0, self.timeout))

    def events_headers(self, last_sequence_id: int) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key}",
            "Accept": "text/event-stream",
            "Last-Event-ID": str(last_sequence_id),
        }

    def websocket_url(self, url: str) -> str:
        return f"{url}{'&' if '?' in url else '?'}{urlencode({'api_key': self.api_key})}"


class ClientBase:
    """What ``Client`` and ``AsyncClient`` hold alike: where Spool is, the key, the retry policy."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        max_retry_wait: float,
        direct_upload_limit: int | None,
    ) -> None:
        self.settings = Settings.resolve(base_url, api_key, timeout, direct_upload_limit)
        self.retry = RetryPolicy(max_retries=max_retries, max_retry_wait=max_retry_wait)
        # The deployment's WebSocket URL (every job's ``links.subscribe`` is the same), once a job's
        # answer named it: a WebSocket stream then connects at once, without first reading its job.
        self.subscribe_url: str | None = None

    def seen(self, answer: Any) -> Any:
        """An answer of the API, passed through; a job's ``links.subscribe`` is remembered."""
        links = answer.get("links") if isinstance(answer, dict) else None
        if isinstance(links, dict) and isinstance(links.get("subscribe"), str) and links["subscribe"]:
            self.subscribe_url = links["subscribe"]
        return answer

    def remembered_link(self) -> str:
        """The WebSocket link the last answer that named one gave (``seen``)."""
        if not self.subscribe_url:
            raise no_websocket(self.settings)
        return self.subscribe_url

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def api_key(self) -> str:
        return self.settings.api_key

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    @property
    def max_retries(self) -> int:
        return self.retry.max_retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries, as openai-python does them: at most ``max_retries`` more attempts, each wait
    at most ``max_retry_wait`` seconds (exponential from ``initial_wait``, with jitter, or the
    server's ``Retry-After``). A 429 asking for longer than the bound, or about a budget, is raised
    at once; so is every 4xx other than 429, and an error sent with ``x-should-retry: false``."""

    max_retries: int = 2
    max_retry_wait: float = 8.0
    initial_wait: float = 0.5
    jitter: Callable[[], float] = random.random

    def delay(self, attempt: int, error: SpoolError) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None: raise ``error`` now."""
        if attempt >= self.max_retries or not isinstance(error, RETRYABLE):
            return None
        if any(k.lower() == "x-should-retry" and v == "false" for k, v in error.headers.items()):
            return None  # the server says a retry cannot succeed (a job larger than the whole limit)
        if isinstance(error, RateLimited):
            if error.code in NEVER_RETRIED:
                return None
            asked = error.retry_after
            if asked is not None:
                return float(asked) if asked <= self.max_retry_wait else None
        backoff = min(self.max_retry_wait, self.initial_wait * 2.0**attempt)
        return float(backoff * (1 - 0.25 * self.jitter()))


# ---------------------------------------------------------------------- calls and answers
@dataclass(frozen=True)
class Call:
    """One HTTP exchange with Spool (or, with ``auth=False``, with a presigned URL)."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    content: bytes | None = field(default=None, repr=False)
    headers: Mapping[str, str] | None = None
    timeout: float | None = None
    auth: bool = True
    answers: frozenset[int] = frozenset()  # error statuses whose body is the answer (health's 503)
    progress: Callable[[int, int], None] | None = None  # bytes of ``content`` sent, total

    def request_args(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments for ``build_request`` of either httpx2 client (without the content
        stream, which each client makes its own kind of)."""
        headers: dict[str, str] = {}
        if self.auth:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        body = self.body
        if body is not None:
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(body))
        headers.update(self.headers or {})
        params = {k: _query_value(v) for k, v in (self.params or {}).items() if v is not None}
        timeout = self.timeout if self.timeout is not None else settings.timeout
        return {
            "method": self.method,
            "url": self.path,
            "params": params,
            "headers": headers,
            "timeout": timeout,
        }

    @cached_property
    def body(self) -> bytes | None:
        return self.content if self.json is None else encode(self.json)

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces, reporting each one sent (for an upload's progress bar)."""
        body = self.body or b""
        for start in range(0, len(body), UPLOAD_CHUNK_BYTES):
            piece = body[start : start + UPLOAD_CHUNK_BYTES]
            yield piece
            if self.progress is not None:
                self.progress(start + len(piece), len(body))


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def unreachable(settings: Settings, call: Call, error: Exception) -> ConnectionFailed:
    url = call.path if call.path.startswith(("http://", "https://")) else settings.base_url
    if isinstance(error, httpx2.TimeoutException) and not isinstance(error, httpx2.ConnectTimeout):
        # Connected, and no answer: the server is there but busy or hung ("timed out" and "is the
        # stack running?" sent people looking for a stack that was running).
        waited = call.timeout if call.timeout is not None else settings.timeout
        return ConnectionFailed(url, f"no answer within {waited:g} s", answered=False)
    return broken(url, error)


def broken(url: str, error: BaseException) -> ConnectionFailed:
    """A connection that failed or broke off, as the error a caller sees after the retries."""
    return ConnectionFailed(url, str(error) or type(error).__name__)


def answer(call: Call, response: httpx2.Response) -> Any:
    """The answer's JSON body, or the typed error it stands for."""
    body = _json_or_none(response.content)
    if response.status_code >= 400 and response.status_code not in call.answers:
        raise error_for(response.status_code, body, response.headers)
    if response.content and body is None and "json" in response.headers.get("content-type", ""):
        raise ConnectionFailed(str(response.url), "the answer was cut short")  # a retry asks again
    return body


def raise_for_stream(response: httpx2.Response, content: bytes) -> None:
    if response.status_code >= 400:
        raise error_for(response.status_code, _json_or_none(content), response.headers)


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


# ---------------------------------------------------------------------- the calls of the API
def job_call(job_id: str, *, output: bool = True) -> Call:
    return Call("GET", f"/v1/jobs/{segment(job_id)}", params=None if output else {"output": False})


def chunks_call(job_id: str, after: int, limit: int, wait: int, timeout: float) -> Call:
    params = {"after": after, "limit": limit, "wait": wait}
    return Call("GET", f"/v1/jobs/{segment(job_id)}/chunks", params=params, timeout=wait + timeout)


def list_call(resource: str, limit: int, cursor: str | None, status: str | None = None) -> Call:
    return Call("GET", f"/v1/{resource}", params={"status": status, "limit": limit, "cursor": cursor})


def health_call(deep: bool) -> Call:
    return Call("GET", "/v1/health", params={"deep": True} if deep else None, answers=frozenset({503}))


def usage_call(since: str | None, until: str | None) -> Call:
    return Call("GET", "/v1/usage", params={"since": since, "until": until})


def job_body(
    message: str | None, messages: list[dict[str, str]] | None, fields: Mapping[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if messages is not None:
        body["messages"] = messages
    else:
        body["message"] = message
    return body


# ---------------------------------------------------------------------- steps (driven by a client)
Steps = Generator[Call, Any, T]


class Driver[R]:
    """Runs steps for a client: ``next()`` is the call to make (None once the steps returned, their
    value in ``result``); the client hands back the answer with ``answer()`` or the error with
    ``fail()``, which the steps may catch."""

    def __init__(self, steps: Steps[R]) -> None:
        self._steps = steps
        self._answer: Any = None
        self._error: SpoolError | None = None
        self.result: R

    def next(self) -> Call | None:
        try:
            if self._error is not None:
                return self._steps.throw(self._error)
            return self._steps.send(self._answer)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def answer(self, value: Any) -> None:
        self._answer, self._error = value, None

    def fail(self, error: SpoolError) -> None:
        self._answer, self._error = None, error


def create_job_steps(body: dict[str, Any], idempotency_key: str | None) -> Steps[dict[str, Any]]:
    """Create a job. The idempotency key is made once and sent again by every retry of this call,
    so a retry after a lost answer never starts a second generation."""
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    try:
        created: dict[str, Any] = yield Call("POST", "/v1/jobs", json=body, headers=headers)
    except Conflict as exc:
        if exc.code != "request_in_progress" or "job_id" not in exc.details:
            raise
        created = yield job_call(exc.details["job_id"])  # our own earlier attempt got through
    return created


SYNC_ATTEMPTS = 6  # reads and diffs of a context that other clients keep changing meanwhile


def sync_steps(
    snap: Snapshot,
    manifest: dict[str, Any] | None,
    manifest_path: Path,
    settings: Settings,
    ttl_seconds: int,
    progress: Progress | None,
) -> Steps[dict[str, Any]]:
    """Make the server's context match the directory, the cheapest way (see ``plan_sync``), then
    remember what was sent. A diff goes with ``If-Match``, the version it was made against; when the
    context is not that version (changed by another client, or a stack restored from an older
    snapshot), or nothing seems to have changed, what the context holds is read and compared file by
    file, and the diff made against it: "unchanged" means the server holds the directory."""
    plan = plan_sync(snap, manifest, settings.base_url, ttl_seconds, settings.direct_upload_limit)
    version = manifest.get("version") if manifest else None
    summary: dict[str, Any] | None = None
    for _ in range(SYNC_ATTEMPTS):
        if plan.action == "create":
            break
        path = f"/v1/contexts/{segment(plan.context_id)}"
        try:
            if plan.action == "none" or not isinstance(version, int):
                context = yield Call("GET", path)  # what the context holds, file by file
                held = {f["path"]: f.get("sha256") for f in context.get("files", [])}
                if held == snap.hashes:  # nothing to send (even if a diff was planned: it is there)
                    summary = {k: v for k, v in context.items() if k != "files"}
                    plan = SyncPlan("none", context_id=plan.context_id, via="none")
                    break
                version = int(context["version"])
                against = {"base_url": settings.base_url, "context_id": plan.context_id, "files": held}
                plan = plan_sync(snap, against, settings.base_url, ttl_seconds, settings.direct_upload_limit)
                continue
            headers = {"If-Match": f'"{version}"'}
            summary = yield _upload_call("PATCH", path, plan, progress, headers=headers)
            break
        except (NotFound, Gone):  # expired or deleted: upload afresh
            plan = plan_create(snap, ttl_seconds, settings.direct_upload_limit)
        except Conflict as exc:
            if exc.code != "context_conflict":
                raise
            if "current_version" in exc.details:  # not the version the diff was made against
                version = None  # read it, diff again
            else:  # a file it keeps is no longer stored: a context made afresh stores it again
                plan = plan_create(snap, ttl_seconds, settings.direct_upload_limit)
        except InvalidRequest as exc:
            # It no longer holds what was last sent (a PATCH without If-Match, sent by a client before
            # this one kept versions, went through and its answer was lost). Afresh, then.
            if exc.code != "path_not_found":
                raise
            plan = plan_create(snap, ttl_seconds, settings.direct_upload_limit)
    if summary is None and plan.action != "create":
        raise SyncError(f"context {plan.context_id} kept changing while this sync ran; run it again")
    if summary is None:
        summary = yield from _create_steps(plan, progress)
    save_manifest(
        manifest_path, settings.base_url, summary["context_id"], snap.hashes, summary.get("version")
    )
    return {**summary, "skipped": snap.skipped, "changed": plan.action != "none", "uploaded_via": plan.via}


def _create_steps(plan: SyncPlan, progress: Progress | None) -> Steps[dict[str, Any]]:
    if plan.via == "direct":
        created: dict[str, Any] = yield _upload_call("POST", "/v1/contexts", plan, progress)
        return created
    upload = yield Call("POST", "/v1/contexts/uploads")
    limit = int(upload.get("max_bytes") or 0)
    if limit and len(plan.body) > limit:
        raise SyncError(
            f"the directory's context document is {len(plan.body):,} bytes; the limit is {limit:,}"
            " (leave files out with .gitignore)"
        )
    yield _upload_call("PUT", upload["upload_url"], plan, progress, auth=False)
    created = yield Call("POST", "/v1/contexts", json={"upload_id": upload["upload_id"]})
    return created


def _upload_call(
    method: str,
    path: str,
    plan: SyncPlan,
    progress: Progress | None,
    *,
    auth: bool = True,
    headers: Mapping[str, str] | None = None,
) -> Call:
    report = None if progress is None else (lambda done, total: progress("upload", done, total))
    return Call(method, path, content=plan.body, auth=auth, progress=report, headers=headers)


# ---------------------------------------------------------------------- streams
RESULT_KEYS = ("job_id", "status", "usage", "cost_usd", "error")


class StreamState:
    """Where a job's stream stands: the last chunk taken (so a reconnect resumes after it, and a
    duplicate or stale chunk is dropped), the chunks and tokens so far, and, at the end, ``result``
    (the done event, completed from the job when the transport's done lacks error or cost)."""

    def __init__(
        self, job_id: str, after: int = 0, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.job_id = job_id
        self.last_sequence_id = after
        self.tokens: int | None = None
        self.chunks = 0
        self.result: dict[str, Any] | None = None
        self._on_progress = on_progress
        self._done: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        return self._done is not None

    def take(self, chunk: Mapping[str, Any]) -> dict[str, Any] | None:
        """The chunk if it is the next one, else None (a duplicate or one out of order)."""
        if chunk.get("sequence_id") != self.last_sequence_id + 1:
            return None
        self.last_sequence_id = int(chunk["sequence_id"])
        self.chunks += 1
        tokens = chunk.get("tokens_total", chunk.get("tokens_generated"))
        if isinstance(tokens, int):
            self.tokens = tokens
        if self._on_progress is not None:
            self._on_progress(
                {"sequence_id": self.last_sequence_id, "tokens_generated": self.tokens, "chunks": self.chunks}
            )
        return dict(chunk)

    def end(self, done: Mapping[str, Any]) -> None:
        self._done = {"job_id": self.job_id, **done}

    # one reader per transport: what each event or page means
    def on_sse(self, event: httpx2.ServerSentEvent) -> dict[str, Any] | None:
        if event.event == "chunk":
            return self.take(_object(event.data))
        if event.event == "done":
            self.end(_object(event.data))
        elif event.event == "error":  # the stream's key was revoked while it ran
            _raise_streamed(_object(event.data))
        return None

    def on_websocket(self, message: Mapping[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        if kind == "chunk":
            return self.take(message)
        if kind == "done":
            self.end({k: v for k, v in message.items() if k != "type"})
        elif kind == "error":
            _raise_streamed(message)
        return None

    def on_page(self, page: Mapping[str, Any]) -> list[dict[str, Any]]:
        taken = [chunk for c in page.get("chunks", []) if (chunk := self.take(c)) is not None]
        if page.get("done"):
            self.end({"status": page.get("status")})
        return taken

    def subscribe_message(self) -> str:
        return json.dumps({"action": "subscribe", "job_id": self.job_id, "after": self.last_sequence_id})

    def events_path(self) -> str:
        return f"/v1/jobs/{segment(self.job_id)}/events"

    def page_call(self, timeout: float, wait: int = 20) -> Call:
        return chunks_call(self.job_id, self.last_sequence_id, 500, wait, timeout)

    # the ending
    def summary_call(self) -> Call | None:
        """The job read (without output) when the done event lacks what ``result`` holds."""
        done = self._done or {}
        if all(key in done for key in RESULT_KEYS):
            return None
        return job_call(self.job_id, output=False)

    def finish(self, job: Mapping[str, Any] | None = None) -> None:
        """Fill ``result``; raise ``JobFailed`` / ``JobCancelled`` when the job did not complete."""
        data = {**(job or {}), **{k: v for k, v in (self._done or {}).items() if v is not None}}
        self.result = {key: data.get(key) for key in RESULT_KEYS}
        usage = self.result.get("usage") or {}
        if isinstance(usage.get("output_tokens"), int):
            self.tokens = usage["output_tokens"]
        ending = ending_error(self.result, self.last_sequence_id)
        if ending is not None:
            raise ending


def ending_error(result: Mapping[str, Any], last_sequence_id: int) -> JobEnded | None:
    if result.get("status") == "failed":
        return JobFailed(result, last_sequence_id)
    if result.get("status") == "cancelled":
        return JobCancelled(result, last_sequence_id)
    return None


def _object(data: str) -> dict[str, Any]:
    value = json.loads(data)
    return value if isinstance(value, dict) else {}


def _raise_streamed(body: Mapping[str, Any]) -> None:
    """An error a stream sent (WebSocket frame, SSE ``error`` event) in Spool's envelope, raised as
    the status its code would have had (a revoked key: ``Unauthorized``, never retried)."""
    code = str((body.get("error") or {}).get("code", ""))
    status = 401 if code == "unauthorized" else 404 if code.endswith("not_found") else 400
    raise error_for(status, dict(body), {})


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be sse, websocket or poll, not {transport!r}")


def websocket_failed(url: str, exc: Exception) -> SpoolError:
    """What a WebSocket connection's failure means: a refused handshake (for the key: raised at once),
    or a broken link (retried)."""
    if not isinstance(exc, InvalidStatus):
        return broken(url, exc)
    status = exc.response.status_code
    if status in (401, 403):
        return Unauthorized(status, None)
    return ConnectionFailed(url, f"the WebSocket handshake was refused with HTTP {status}")


def link_gone(remembered: bool, failure: SpoolError) -> bool:
    """Whether a WebSocket link the client remembered should be read again from the job: it could
    not be connected to (``websocket_failed``: refused, unreachable, or not a WebSocket endpoint),
    and not for the key."""
    return remembered and not isinstance(failure, Unauthorized)


def no_websocket(settings: Settings) -> ConnectionFailed:
    return ConnectionFailed(settings.base_url, "this deployment has no WebSocket URL (links.subscribe)")


__all__ = [
    "Call",
    "RetryPolicy",
    "Settings",
    "StreamState",
    "answer",
    "create_job_steps",
    "sync_steps",
]
