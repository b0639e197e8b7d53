"""The Python clients against an in-memory Spool (httpx2.MockTransport): bounded retries with one
idempotency key, streams that end as the job ended, and the directory sync's plan."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from spool import AsyncClient, Client
from spool._core import RetryPolicy
from spool.aio import AsyncJobStream
from spool.client import (
    ConnectionFailed,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    SyncError,
    Unauthorized,
)
from spool.sync import LAMBDA_PAYLOAD_BYTES, serialized_size, snapshot

Handler = Callable[[httpx2.Request], httpx2.Response]
URL = "http://127.0.0.1:8000"


def error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    body = {
        "error": {"code": code, "message": code.replace("_", " "), "details": {"n": 1}, "suggestions": ["x"]}
    }
    return httpx2.Response(status, json=body, headers=headers or {})


class Recorder:
    """Answers from a script, one a request (the last one repeated), and keeps what was sent."""

    def __init__(self, *answers: httpx2.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(handler: Handler, sleeps: Sleeps | None = None, **options: Any) -> Client:
    sleep = sleeps if sleeps is not None else Sleeps()
    return Client(URL, "sk-test", sleep=sleep, http_transport=httpx2.MockTransport(handler), **options)


def created() -> httpx2.Response:
    return httpx2.Response(202, json={"job_id": "job_1", "status": "queued"})


# ---------------------------------------------------------------------- retries
def test_budget_exceeded_is_raised_at_once_without_sleeping() -> None:
    server, sleeps = Recorder(error(429, "budget_exceeded", {"Retry-After": "6000"})), Sleeps()
    with pytest.raises(RateLimited) as raised:
        client_for(server, sleeps).create_job("hi", model="sim-fast")
    assert raised.value.code == "budget_exceeded"
    assert raised.value.retry_after == 6000
    assert sleeps == [] and len(server.requests) == 1


def test_a_429_asking_longer_than_the_bound_is_raised_at_once() -> None:
    server, sleeps = Recorder(error(429, "token_limit_exceeded", {"Retry-After": "45"})), Sleeps()
    with pytest.raises(RateLimited):
        client_for(server, sleeps, max_retry_wait=8.0).create_job("hi")
    assert sleeps == [] and len(server.requests) == 1


def test_a_429_that_says_a_retry_cannot_succeed_is_raised_at_once() -> None:
    """A job larger than the whole per-minute limit: Retry-After is 1 s (the bucket is whole), but
    waiting will not help, and the server says so with ``x-should-retry: false``."""
    never = error(429, "token_limit_exceeded", {"Retry-After": "1", "x-should-retry": "false"})
    server, sleeps = Recorder(never), Sleeps()
    with pytest.raises(RateLimited):
        client_for(server, sleeps).create_job("hi", max_tokens=300_000)
    assert sleeps == [] and len(server.requests) == 1


def test_short_429s_are_retried_with_the_same_idempotency_key() -> None:
    server, sleeps = Recorder(error(429, "rate_limited", {"Retry-After": "1"}), created()), Sleeps()
    job = client_for(server, sleeps).create_job("hi", model="sim-fast")
    assert job["job_id"] == "job_1"
    assert sleeps == [1.0]
    keys = {r.headers["Idempotency-Key"] for r in server.requests}
    assert len(server.requests) == 2 and len(keys) == 1


@pytest.mark.parametrize(
    "failure",
    [error(503, "service_unavailable"), httpx2.ConnectError("connection refused")],
    ids=["5xx", "connection"],
)
def test_5xx_and_connection_errors_are_retried_at_most_max_retries(failure: Any) -> None:
    server, sleeps = Recorder(failure), Sleeps()
    with pytest.raises((ServerError, ConnectionFailed)):
        client_for(server, sleeps, max_retries=3).create_job("hi", idempotency_key="k-1")
    assert len(server.requests) == 4  # the first attempt and three retries
    assert {r.headers["Idempotency-Key"] for r in server.requests} == {"k-1"}
    assert len(sleeps) == 3 and all(0 < s <= 8.0 for s in sleeps)


def test_an_unreachable_server_names_the_url_and_how_to_start_the_stack() -> None:
    with pytest.raises(ConnectionFailed) as raised:
        client_for(Recorder(httpx2.ConnectError("refused"))).job("job_1")
    assert URL in raised.value.message
    assert raised.value.code == "connection_failed"
    assert any("make dev" in s for s in raised.value.suggestions)
    remote = Client(
        "https://api.example.com",
        "k",
        max_retries=0,
        http_transport=httpx2.MockTransport(Recorder(httpx2.ConnectTimeout("timed out"))),
    )
    with pytest.raises(ConnectionFailed) as far:
        remote.models()
    assert not any("make dev" in s for s in far.value.suggestions)


def test_a_server_that_never_answers_says_how_many_times_it_was_asked() -> None:
    """Three 30 s waits (91 s) read "no answer within 30 s"."""
    server, sleeps = Recorder(httpx2.ReadTimeout("no answer")), Sleeps()
    with pytest.raises(ConnectionFailed) as raised:
        client_for(server, sleeps, timeout=30).models()
    assert len(server.requests) == 3
    assert "no answer within 30 s (asked 3 times)" in raised.value.message
    assert "did not answer" in raised.value.suggestions[0]
    with pytest.raises(ConnectionFailed) as once:
        client_for(server, sleeps, timeout=30, max_retries=0).models()
    assert once.value.message.endswith("no answer within 30 s")


def test_other_4xx_are_never_retried_and_carry_the_envelope() -> None:
    server, sleeps = Recorder(error(400, "invalid_request")), Sleeps()
    with pytest.raises(InvalidRequest) as raised:
        client_for(server, sleeps).create_job("hi")
    assert (raised.value.status, raised.value.details, raised.value.suggestions) == (400, {"n": 1}, ["x"])
    assert len(server.requests) == 1 and sleeps == []


def test_a_retry_that_meets_its_own_earlier_attempt_answers_that_job() -> None:
    in_progress = httpx2.Response(
        409, json={"error": {"code": "request_in_progress", "message": "m", "details": {"job_id": "job_9"}}}
    )
    server = Recorder(in_progress, httpx2.Response(200, json={"job_id": "job_9", "status": "running"}))
    assert client_for(server).create_job("hi")["job_id"] == "job_9"
    assert server.requests[1].url.path == "/v1/jobs/job_9"


def test_the_backoff_is_bounded_and_grows() -> None:
    policy = RetryPolicy(max_retries=10, max_retry_wait=8.0, jitter=lambda: 0.0)
    failure = ServerError(502, None)
    assert [policy.delay(n, failure) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.delay(10, failure) is None
    assert policy.delay(0, NotFound(404, None)) is None
    assert policy.delay(0, RateLimited(429, None)) == 0.5  # no Retry-After: the back-off


# ---------------------------------------------------------------------- small endpoints
def test_job_without_output_lists_pages_and_health_503_is_returned() -> None:
    pages = {
        None: {"data": [{"job_id": "job_2"}, {"job_id": "job_1"}], "next_cursor": "c1"},
        "c1": {"data": [{"job_id": "job_0"}], "next_cursor": None},
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        params = dict(request.url.params)
        if request.url.path == "/v1/jobs":
            assert params["limit"] == "2" and params.get("status") == "completed"
            return httpx2.Response(200, json=pages[params.get("cursor")])
        if request.url.path == "/v1/health":
            return httpx2.Response(503, json={"status": "down", "checks": {}, "error": {"code": "x"}})
        assert params == {"output": "false"}
        return httpx2.Response(200, json={"job_id": "job_1", "status": "running"})

    client = client_for(handler)
    assert [j["job_id"] for j in client.iter_jobs(status="completed", page_size=2)] == [
        "job_2",
        "job_1",
        "job_0",
    ]
    assert client.health()["status"] == "down"
    assert client.job("job_1", output=False)["status"] == "running"


# ---------------------------------------------------------------------- streams
def sse(*events: tuple[str, dict[str, Any]]) -> httpx2.Response:
    text = "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in events)
    return httpx2.Response(200, text=text, headers={"Content-Type": "text/event-stream"})


FAILED = {
    "job_id": "job_1",
    "status": "failed",
    "usage": {"input_tokens": 5, "output_tokens": 2, "estimated_tokens": 9},
    "cost_usd": 0.0001,
    "error": {"code": "provider_error", "message": "boom", "details": {"last_sequence_id": 2}},
    "last_sequence_id": 2,
}


def test_sse_resumes_after_an_early_end_then_raises_job_failed_after_every_chunk() -> None:
    server = Recorder(
        sse(("chunk", {"sequence_id": 1, "text": "a"})),  # the stream's time limit: no done
        sse(
            ("chunk", {"sequence_id": 1, "text": "a"}),
            ("chunk", {"sequence_id": 2, "text": "b"}),
            ("done", FAILED),
        ),
    )
    progress: list[dict[str, Any]] = []
    stream = client_for(server).stream("job_1", on_progress=progress.append)
    received: list[str] = []
    with pytest.raises(JobFailed) as raised:
        received.extend(stream)
    assert received == ["a", "b"]  # the repeated chunk 1 is dropped
    assert [r.headers["Last-Event-ID"] for r in server.requests] == ["0", "1"]
    failure = raised.value
    assert (failure.code, failure.status, failure.last_sequence_id, failure.cost_usd) == (
        "provider_error",
        "failed",
        2,
        0.0001,
    )
    assert failure.details == {"last_sequence_id": 2}
    assert stream.result is not None and stream.result["usage"]["output_tokens"] == 2
    assert stream.tokens == 2
    assert progress[-1] == {"sequence_id": 2, "tokens_generated": None, "chunks": 2}


def test_a_stream_whose_key_was_revoked_raises_unauthorized_after_its_chunks_without_reconnecting() -> None:
    revoked = {
        "error": {
            "code": "unauthorized",
            "message": "This API key was revoked",
            "details": {"job_id": "job_1", "last_sequence_id": 1},
            "suggestions": ["Job job_1 goes on: read the rest with an active key"],
            "request_id": "req-1",
        }
    }
    server = Recorder(sse(("chunk", {"sequence_id": 1, "text": "a"}), ("error", revoked)))
    stream = client_for(server).stream("job_1")
    received: list[str] = []
    with pytest.raises(Unauthorized) as raised:
        received.extend(stream)
    assert received == ["a"] and len(server.requests) == 1  # no reconnect with the revoked key
    assert raised.value.details["last_sequence_id"] == 1


def test_poll_reads_the_job_for_the_ending_and_raises_job_cancelled() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/chunks"):
            after = int(request.url.params["after"])
            chunks = [{"sequence_id": after + 1, "text": f"t{after + 1}"}] if after < 2 else []
            return httpx2.Response(200, json={"status": "cancelled", "chunks": chunks, "done": after >= 1})
        assert request.url.params["output"] == "false"
        return httpx2.Response(
            200, json={**FAILED, "status": "cancelled", "error": None, "progress": {"last_sequence_id": 2}}
        )

    stream = client_for(handler).stream("job_1", transport="poll")
    received: list[str] = []
    with pytest.raises(JobCancelled) as raised:
        received.extend(stream)
    assert received == ["t1", "t2"]
    assert raised.value.code == "job_cancelled" and raised.value.usage == FAILED["usage"]
    with pytest.raises(ValueError, match="transport"):
        client_for(handler).stream("job_1", transport="carrier-pigeon")


def test_a_completed_stream_just_stops_with_its_result() -> None:
    done = {**FAILED, "status": "completed", "error": None}
    stream = client_for(Recorder(sse(("chunk", {"sequence_id": 1, "text": "x"}), ("done", done)))).stream(
        "job_1"
    )
    assert list(stream) == ["x"]
    assert stream.result == {k: done[k] for k in ("job_id", "status", "usage", "cost_usd", "error")}


# ---------------------------------------------------------------------- directory sync
class FakeContexts:
    """Enough of /v1/contexts and the presigned upload to follow what a sync sends: one context,
    holding each file's hash, its version moved by every write, and ``If-Match`` honoured."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []
        self.version = 0
        self.uploaded = b""
        self.gone = False
        self.files: dict[str, str] = {}  # path -> sha256 of the content, as GET lists them
        self.blob_missing = False

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        self.requests.append((request.method, request.url.path, len(body)))
        if request.method == "PUT":
            assert "Authorization" not in request.headers  # a presigned URL carries its own
            self.uploaded = body
            return httpx2.Response(200)
        if request.url.path == "/v1/contexts/uploads":
            return httpx2.Response(
                201,
                json={"upload_id": "upl_1", "upload_url": "http://s3.local/up/upl_1", "max_bytes": 50 << 20},
            )
        if request.url.path.startswith("/v1/contexts/ctx_") and self.gone:
            return error(410, "context_expired")
        if request.method == "GET":
            listed = [{"path": path, "sha256": sha} for path, sha in self.files.items()]
            return httpx2.Response(200, json={**self.summary(), "files": listed})
        document = json.loads(body)
        if request.method == "PATCH":
            expected = request.headers.get("If-Match")
            if expected is not None and expected.strip('"') != str(self.version):
                envelope = {"code": "context_conflict", "details": {"current_version": self.version}}
                return httpx2.Response(409, json={"error": envelope})
            if self.blob_missing:  # a file it keeps is no longer stored (the server's other 409)
                return httpx2.Response(409, json={"error": {"code": "context_conflict", "details": {}}})
            self.edit(document.get("upsert", []), document.get("delete", []))
            return httpx2.Response(200, json=self.summary())
        if "upload_id" in document:
            document = json.loads(self.uploaded)
        self.files, self.gone = {}, False  # a new context
        self.edit(document["files"], [])
        return httpx2.Response(201, json=self.summary())

    def edit(self, upsert: list[dict[str, str]], delete: list[str]) -> None:
        """A write from elsewhere (another client), or the one a request asked for."""
        self.files.update({f["path"]: hashlib.sha256(f["content"].encode()).hexdigest() for f in upsert})
        for path in delete:
            self.files.pop(path)
        self.version += 1

    def summary(self) -> dict[str, Any]:
        return {"context_id": "ctx_1", "version": self.version, "file_count": len(self.files)}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPOOL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.usefixtures("cache")
def test_a_missing_path_a_file_or_nothing_to_upload_is_a_sync_error(tmp_path: Path) -> None:
    server = FakeContexts()
    client = client_for(server)
    with pytest.raises(SyncError, match="no such directory"):
        client.sync_directory(tmp_path / "nope")
    (tmp_path / "file.py").write_text("x = 1\n")
    with pytest.raises(SyncError, match="not a directory"):
        client.sync_directory(tmp_path / "file.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SyncError, match="empty"):
        client.sync_directory(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "logo.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "bin" / "latin.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "bin" / "two\nlines.py").write_text("x = 1\n")  # the server refuses such a name
    (tmp_path / "bin" / "evil\u202egnp.py").write_text("x = 1\n")
    expected = r"4 skipped \(2 a name with a control character, 1 binary, 1 not UTF-8 text\)"
    with pytest.raises(SyncError, match=expected):
        client.sync_directory(tmp_path / "bin")
    assert server.requests == []


@pytest.mark.usefixtures("cache")
def test_skipped_files_are_reported_and_an_unchanged_sync_sends_only_a_read(tmp_path: Path) -> None:
    tmp_path = tmp_path / "project"
    tmp_path.mkdir()
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "big.txt").write_text("x" * 1_000_001)
    (tmp_path / "ignored.log").write_text("noise")
    (tmp_path / ".gitignore").write_text("*.log\n")
    server = FakeContexts()
    client = client_for(server)
    first = client.sync_directory(tmp_path)
    assert (first["changed"], first["uploaded_via"], first["version"]) == (True, "direct", 1)
    assert first["skipped"] == [
        {"path": "big.txt", "reason": "too large (over 1,000,000 bytes)"},
        {"path": "logo.png", "reason": "binary"},
    ]
    again = client.sync_directory(tmp_path)
    assert (again["changed"], again["uploaded_via"], again["version"]) == (False, "none", 1)
    assert "files" not in again
    assert server.requests[1][:2] == ("GET", "/v1/contexts/ctx_1")
    (tmp_path / "a.py").write_text("a = 2\n")
    patched = client.sync_directory(tmp_path)
    assert (patched["changed"], patched["uploaded_via"], patched["version"]) == (True, "patch", 2)
    assert server.requests[2][:2] == ("PATCH", "/v1/contexts/ctx_1")
    server.gone = True  # expired: a sync with no change uploads afresh
    renewed = client.sync_directory(tmp_path)
    assert (renewed["changed"], renewed["uploaded_via"]) == (True, "direct")
    assert [r[0] for r in server.requests[3:]] == ["GET", "POST"]


def synced_project(tmp_path: Path, files: dict[str, str]) -> tuple[Path, FakeContexts, Client]:
    """A directory (beside the client's cache) synced once to a fake server."""
    root = tmp_path / "project"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    server = FakeContexts()
    client = client_for(server)
    client.sync_directory(root)
    return root, server, client


@pytest.mark.usefixtures("cache")
def test_a_context_changed_elsewhere_is_brought_back_to_the_directory(tmp_path: Path) -> None:
    """Another client patched the context (or the stack restored an older snapshot): a sync with no
    local change said "unchanged" while the server held other files, and a diff was merged into
    whatever the server held. Now what it holds is compared file by file, and a diff goes with the
    version it was made against (If-Match)."""
    tmp_path, server, client = synced_project(tmp_path, {"a.py": "a = 1\n", "b.py": "b = 2\n"})
    local = dict(server.files)
    server.edit([{"path": "a.py", "content": "a = 999\n"}], ["b.py"])  # another client, version 2
    fixed = client.sync_directory(tmp_path)
    assert (fixed["changed"], fixed["uploaded_via"], fixed["version"]) == (True, "patch", 3)
    assert server.files == local
    assert [m for m, _, _ in server.requests[1:]] == ["GET", "PATCH"]
    # a local change while the server moved on: the diff is refused (409), read again, sent again
    (tmp_path / "b.py").write_text("b = 3\n")
    server.edit([{"path": "c.py", "content": "c"}], [])  # version 4, where the client last saw 3
    again = client.sync_directory(tmp_path)
    assert (again["changed"], again["version"]) == (True, 5)
    assert server.files == {
        p: hashlib.sha256(t.encode()).hexdigest() for p, t in [("a.py", "a = 1\n"), ("b.py", "b = 3\n")]
    }
    assert [m for m, _, _ in server.requests[3:]] == ["PATCH", "GET", "PATCH"]
    unchanged = client.sync_directory(tmp_path)
    assert (unchanged["changed"], unchanged["uploaded_via"]) == (False, "none")
    # a 409 for a file whose stored content is gone is no version to catch up with: made afresh
    (tmp_path / "a.py").write_text("a = 4\n")
    server.blob_missing = True
    made = client.sync_directory(tmp_path)
    assert (made["changed"], made["uploaded_via"]) == (True, "direct")
    assert [m for m, _, _ in server.requests[-2:]] == ["PATCH", "POST"]


@pytest.mark.usefixtures("cache")
def test_a_patch_whose_answer_was_lost_is_not_retried_into_a_stuck_sync(tmp_path: Path) -> None:
    """The PATCH went through, its answer was lost, and its retry deleted a path already gone: a 400
    path_not_found, and every later sync of the directory failed the same way. The context no longer
    holds what the client last sent, so it uploads afresh."""
    tmp_path, server, client = synced_project(tmp_path, {"a.py": "a", "b.py": "b"})
    (tmp_path / "b.py").unlink()
    lost = {"first": True}

    def patch_lost_once(request: httpx2.Request) -> httpx2.Response:
        if request.method == "PATCH":
            server.requests.append((request.method, request.url.path, 0))
            if lost.pop("first", False):
                raise httpx2.ReadTimeout("the answer was lost")
            return error(400, "path_not_found")
        return server(request)

    client = client_for(patch_lost_once)
    result = client.sync_directory(tmp_path)
    assert (result["changed"], result["uploaded_via"]) == (True, "direct")
    assert [r[0] for r in server.requests[1:]] == ["PATCH", "PATCH", "POST"]
    again = client_for(server).sync_directory(tmp_path)  # and the next sync finds nothing to send
    assert (again["changed"], again["uploaded_via"]) == (False, "none")


@pytest.mark.usefixtures("cache")
def test_a_document_over_the_direct_limit_goes_through_the_presigned_upload(tmp_path: Path) -> None:
    for index in range(8):  # 8 x 900 KB: over Lambda's 6 MiB as a direct body
        (tmp_path / f"part{index}.txt").write_text(("line of text\n" * 70_000)[:900_000])
    server = FakeContexts()
    reports: list[tuple[str, int, int]] = []
    summary = client_for(server).sync_directory(tmp_path, progress=lambda *r: reports.append(r))
    assert summary["uploaded_via"] == "presigned"
    assert [(m, p) for m, p, _ in server.requests] == [
        ("POST", "/v1/contexts/uploads"),
        ("PUT", "/up/upl_1"),
        ("POST", "/v1/contexts"),
    ]
    document = json.loads(server.uploaded)
    assert len(document["files"]) == 8 and document["ttl_seconds"] == 3600
    uploads = [(done, total) for stage, done, total in reports if stage == "upload"]
    assert uploads[-1] == (len(server.uploaded), len(server.uploaded))
    assert [done for done, _ in uploads] == sorted(done for done, _ in uploads)
    assert reports[:1] == [("read", 1, 8)]
    assert serialized_size(server.uploaded) > LAMBDA_PAYLOAD_BYTES


def test_the_direct_limit_counts_the_escaping_inside_a_lambda_event(tmp_path: Path) -> None:
    assert serialized_size(b'{"a":"x\\n"}') == len(b'{"a":"x\\n"}') + 5
    (tmp_path / "a.txt").write_text("a")
    assert snapshot(tmp_path).files == {"a.txt": "a"}


def test_every_gitignore_of_the_tree_is_honoured_as_git_honours_it(tmp_path: Path) -> None:
    """A .gitignore in a subfolder (only the top one was read: a package's secrets were uploaded):
    its patterns are relative to its folder, and a deeper file decides over the ones above it."""
    (tmp_path / ".gitignore").write_text("*.log\n/top-only.txt\n")
    (tmp_path / "app.py").write_text("a")
    (tmp_path / "top-only.txt").write_text("t")
    pkg = tmp_path / "pkg"
    (pkg / "secrets").mkdir(parents=True)
    (pkg / ".gitignore").write_text("*.env\nsecrets/\n!keep.log\n")
    (pkg / "prod.env").write_text("PASSWORD=x")
    (pkg / "secrets" / "pw.txt").write_text("x")
    (pkg / "keep.log").write_text("kept")
    (pkg / "other.log").write_text("ignored from above")
    (pkg / "top-only.txt").write_text("anchored to the top: kept here")
    (pkg / "mod.py").write_text("m")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "dev.env").write_text("not under pkg: kept")
    assert sorted(snapshot(tmp_path).files) == [
        ".gitignore",
        "app.py",
        "lib/dev.env",
        "pkg/.gitignore",
        "pkg/keep.log",
        "pkg/mod.py",
        "pkg/top-only.txt",
    ]


def test_a_file_name_that_is_not_utf8_is_skipped_and_said(tmp_path: Path) -> None:
    """One such name crashed the whole sync with a UnicodeEncodeError."""
    (tmp_path / "ok.txt").write_text("ok")
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name")
    snap = snapshot(tmp_path)
    assert snap.files == {"ok.txt": "ok"}
    assert snap.skipped == [{"path": "caf\ufffd.txt", "reason": "a name that is not UTF-8"}]


def test_unreadable_files_and_folders_and_links_out_are_skipped_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user cannot read, or what only links out of the directory, is listed as skipped; the
    rest still uploads (one unreadable file aborted the whole sync, a folder was left out unsaid, and
    a link to a secret elsewhere was uploaded as a file)."""
    secret = tmp_path / "elsewhere" / "credentials"
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = x")
    root = tmp_path / "repo"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "b.txt").write_text("hidden")
    (root / "ok.txt").write_text("ok")
    (root / "x.txt").write_text("x")
    (root / "inside").symlink_to(root / "ok.txt")
    (root / "out").symlink_to(secret)
    (root / "dangling").symlink_to(root / "nowhere")  # and links that lead to no file
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    os.mkfifo(root / "pipe")  # not a file anyone wrote: left out unsaid
    (root / ".git").mkdir()  # ignored folders are not entered
    denied = {root / "x.txt", root / "locked", root / ".git"}  # as a user without read permission
    read_bytes, scandir = Path.read_bytes, os.scandir

    def guarded_read(path: Path) -> bytes:
        if path in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    def guarded_scandir(path: Any = ".") -> Any:
        if Path(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(Path, "read_bytes", guarded_read)
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    snap = snapshot(root)
    assert snap.files == {"inside": "ok", "ok.txt": "ok"}
    assert sorted(snap.skipped, key=lambda s: s["path"]) == [
        {"path": "dangling", "reason": "a link that leads to no file"},
        {"path": "locked/", "reason": "unreadable directory (Permission denied)"},
        {"path": "loop1", "reason": "a link that leads to no file"},
        {"path": "loop2", "reason": "a link that leads to no file"},
        {"path": "out", "reason": "a link to a file outside the directory"},
        {"path": "x.txt", "reason": "unreadable (Permission denied)"},
    ]


def test_one_name_in_two_unicode_forms_syncs_once_and_names_the_other(tmp_path: Path) -> None:
    """The server refuses the pair (duplicate_path): a Linux directory holding both forms of
    ``café.py`` failed its whole sync."""
    composed, decomposed = "caf\u00e9.py", "cafe\u0301.py"
    (tmp_path / composed).write_text("1")
    (tmp_path / decomposed).write_text("2")
    snap = snapshot(tmp_path)
    assert list(snap.files) == [sorted([composed, decomposed])[0]]
    other = sorted([composed, decomposed])[1]
    assert snap.skipped == [
        {
            "path": other,
            "reason": f"the name of {sorted([composed, decomposed])[0]!r} in another Unicode form",
        }
    ]


# ---------------------------------------------------------------------- AsyncClient
def async_client_for(handler: Handler, sleeps: list[float], **options: Any) -> AsyncClient:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return AsyncClient(URL, "sk-test", sleep=sleep, http_transport=httpx2.MockTransport(handler), **options)


def test_the_async_client_retries_and_raises_as_the_sync_one() -> None:
    server, sleeps = (
        Recorder(error(502, "bad_gateway"), error(429, "rate_limited", {"Retry-After": "2"}), created()),
        [],
    )
    refused = Recorder(error(429, "budget_exceeded", {"Retry-After": "6000"}))

    async def main() -> None:
        client = async_client_for(server, sleeps)
        assert (await client.create_job("hi"))["job_id"] == "job_1"
        with pytest.raises(RateLimited):
            await async_client_for(refused, sleeps).create_job("hi")
        await client.close()

    asyncio.run(main())
    assert len({r.headers["Idempotency-Key"] for r in server.requests}) == 1
    assert len(server.requests) == 3 and sleeps[1] == 2.0 and len(sleeps) == 2


async def drain(stream: AsyncJobStream, into: list[str]) -> None:
    async for text in stream:
        into.append(text)


def test_the_async_stream_raises_job_failed_after_its_chunks() -> None:
    server = Recorder(sse(("chunk", {"sequence_id": 1, "text": "a"}), ("done", FAILED)))

    async def main() -> list[str]:
        received: list[str] = []
        async with async_client_for(server, []) as client:
            with pytest.raises(JobFailed):
                await drain(client.stream("job_1"), received)
        return received

    assert asyncio.run(main()) == ["a"]


@pytest.mark.usefixtures("cache")
def test_the_async_sync_plans_as_the_sync_one(tmp_path: Path) -> None:
    tmp_path = tmp_path / "project"
    tmp_path.mkdir()
    (tmp_path / "a.py").write_text("a = 1\n")
    server = FakeContexts()

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with async_client_for(server, [], direct_upload_limit=10) as client:
            return await client.sync_directory(tmp_path), await client.sync_directory(tmp_path)

    first, second = asyncio.run(main())
    assert first["uploaded_via"] == "presigned" and second["changed"] is False


def test_the_async_client_has_the_sync_surface() -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.method, request.url.path, dict(request.url.params)))
        if request.url.path.endswith("/chunks"):
            after = int(request.url.params["after"])
            chunks = [{"sequence_id": 1, "text": "p"}] if after == 0 else []
            return httpx2.Response(200, json={"status": "completed", "chunks": chunks, "done": after == 1})
        if request.url.path in ("/v1/jobs", "/v1/contexts") and request.method == "GET":
            cursor = request.url.params.get("cursor")
            return httpx2.Response(
                200, json={"data": [{"n": cursor or "0"}], "next_cursor": None if cursor else "c"}
            )
        if request.method == "DELETE":
            return httpx2.Response(204)
        return httpx2.Response(200, json={**FAILED, "status": "completed", "error": None, "ok": True})

    async def main() -> list[Any]:
        async with async_client_for(handler, []) as client:
            stream = client.stream("job_1", transport="poll")
            texts = []
            await drain(stream, texts)
            return [
                texts,
                stream.result and stream.result["status"],
                [item["n"] async for item in client.iter_jobs(status="running", page_size=5)],
                [item["n"] async for item in client.iter_contexts()],
                (await client.list_jobs())["next_cursor"],
                (await client.list_contexts())["next_cursor"],
                (await client.models())["ok"],
                (await client.usage(since="2026-11-01"))["ok"],
                (await client.health(deep=True))["ok"],
                (await client.get_context("ctx_1"))["ok"],
                (await client.patch_context("ctx_1", delete=["a"]))["ok"],
                await client.delete_context("ctx_1"),
                (await client.create_context([{"path": "a", "content": "b"}]))["ok"],
                (await client.cancel("job_1"))["ok"],
                (await client.chunks("job_1", 1))["done"],
                (await client.request("GET", "/v1/anything"))[0],
            ]

    assert asyncio.run(main()) == [
        ["p"],
        "completed",
        ["0", "c"],
        ["0", "c"],
        "c",
        "c",
        True,
        True,
        True,
        True,
        True,
        None,
        True,
        True,
        True,
        200,
    ]
    assert ("GET", "/v1/jobs", {"status": "running", "limit": "5"}) in seen
    assert ("GET", "/v1/health", {"deep": "true"}) in seen
    assert ("GET", "/v1/usage", {"since": "2026-11-01"}) in seen


def test_an_id_is_one_path_segment_whatever_it_holds() -> None:
    """``spool jobs get ../contexts`` printed the tenant's context listing as a job, and an id holding
    ``?`` sent a query of its own: every id is escaped as one segment of the path."""
    requests: list[httpx2.Request] = []

    def server(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        return httpx2.Response(200, json={"job_id": "x", "status": "queued"})

    client = client_for(server)
    client.job("../contexts")
    client.job("job_x?output=false")
    client.cancel("job_a/../../contexts")
    client.get_context("ctx_1#frag")
    sent = [(r.url.raw_path.decode(), r.url.query.decode()) for r in requests]
    assert sent == [
        ("/v1/jobs/..%2Fcontexts", ""),
        ("/v1/jobs/job_x%3Foutput%3Dfalse", ""),
        ("/v1/jobs/job_a%2F..%2F..%2Fcontexts/cancel", ""),
        ("/v1/contexts/ctx_1%23frag", ""),
    ]

    async def each() -> None:
        async with async_client_for(server, []) as aclient:
            await aclient.cancel("../x")
            await aclient.get_context("..")

    asyncio.run(each())
    assert [r.url.raw_path.decode() for r in requests[-2:]] == [
        "/v1/jobs/..%2Fx/cancel",
        "/v1/contexts/%2E%2E",
    ]
