"""Server-Sent Events and CORS through the embedded stack, as curl, a browser or a web app use them:
chunks arrive as they are written, Last-Event-ID resumes, a stream cut by the network or by its time
limit loses nothing, worker crashes are invisible, links.events needs no header, and every route
answers a page on another origin."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import httpx2
import pytest

from tests.e2e.conftest import DEV_KEY, OTHER_KEY, STREAM_MAX_SECONDS, RunningStack
from tests.e2e.test_jobs_http import create, wait_terminal
from tests.support import sse_events, wait_for

AUTH = {"Authorization": f"Bearer {DEV_KEY}"}


class Reader:
    """One SSE connection read on a thread, so a test can watch events arrive and cut it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []
        self.status = 0
        self.headers: dict[str, str] = {}
        self.error: Exception | None = None
        self.ended = threading.Event()
        self._client = httpx2.Client(timeout=httpx2.Timeout(120, connect=30))
        self._thread = threading.Thread(target=self._run, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                self.status, self.headers = response.status_code, dict(response.headers)
                for event in sse_events(response.iter_lines()):
                    if "comment" in event:
                        self.comments.append(event["comment"])
                    elif event["event"] in {"chunk", "done"}:
                        self.events.append(event)
        except httpx2.HTTPError as exc:  # the connection broke off
            self.error = exc
        finally:
            self.ended.set()

    def wait(self, timeout: float = 120) -> Reader:
        assert self.ended.wait(timeout), "the stream did not end"
        self._client.close()
        return self

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "chunk"]

    @property
    def done(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "done"), None)


def events_url(stack: RunningStack, job_id: str, query: str = "") -> str:
    return f"{stack.base_url}/v1/jobs/{job_id}/events{query}"


def follow(stack: RunningStack, job_id: str, last: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Read to `done`, reconnecting with Last-Event-ID whenever a stream ends early, as EventSource
    does; returns the chunk events and how many connections it took."""
    chunks: list[dict[str, Any]] = []
    connections = 0
    while True:
        headers = {**AUTH, **({"Last-Event-ID": last} if last else {})}
        reader = Reader(events_url(stack, job_id), headers).wait()
        connections += 1
        assert reader.status == 200, reader.status
        chunks += reader.chunks
        if reader.chunks:
            last = reader.chunks[-1]["id"]
        if reader.done:
            return chunks, connections
        assert connections < 100, "the stream never reached done"


def assert_whole(chunks: list[dict[str, Any]], job: dict[str, Any]) -> None:
    assert [int(c["id"]) for c in chunks] == list(range(1, len(chunks) + 1))  # no gap, no duplicate
    assert [c["data"]["sequence_id"] for c in chunks] == [int(c["id"]) for c in chunks]
    assert "".join(c["data"]["text"] for c in chunks) == job["output"]


def test_chunks_arrive_while_the_job_is_still_writing_them(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "stream me", "model": "sim-realtime", "max_tokens": 200})
    reader = Reader(events_url(dev_stack, job["job_id"]), AUTH)
    wait_for(lambda: reader.chunks or reader.ended.is_set(), timeout=60, what="the first chunk")
    assert reader.chunks, reader.error
    status = dev_stack.request("GET", f"/v1/jobs/{job['job_id']}")[2]["status"]
    assert status in {"queued", "running"}  # the first event came before the job ended: not buffered
    reader.wait()
    assert reader.headers["content-type"].startswith("text/event-stream")
    rest, _ = follow(dev_stack, job["job_id"], reader.chunks[-1]["id"]) if not reader.done else ([], 0)
    finished = wait_terminal(dev_stack, job["job_id"])
    assert_whole(reader.chunks + rest, finished)


def test_a_killed_reader_resumes_from_last_event_id(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "resume me", "model": "sim-fast", "max_tokens": 2000})
    finished = wait_terminal(dev_stack, job["job_id"])
    first = Reader(events_url(dev_stack, job["job_id"]), AUTH).wait()
    upto = [c for c in first.chunks if int(c["id"]) <= 17]  # what a reader killed after id 17 had
    resumed = Reader(events_url(dev_stack, job["job_id"], "?after=3"), {**AUTH, "Last-Event-ID": "17"}).wait()
    assert resumed.chunks[0]["id"] == "18"  # the header wins over ?after=
    assert resumed.done is not None and resumed.done["data"]["status"] == "completed"
    assert_whole(upto + resumed.chunks, finished)


def test_a_reconnect_after_done_is_a_204_without_a_body_and_the_connection_goes_on(
    dev_stack: RunningStack,
) -> None:
    """The 204 came chunked, and its final "0" chunk was read as the next answer's status line on the
    same kept-alive connection (browsers, requests.Session and httpx reuse it)."""
    _, _, job = create(dev_stack, {"message": "stop here", "model": "sim-fast", "max_tokens": 20})
    wait_terminal(dev_stack, job["job_id"])
    with httpx2.Client(timeout=30, limits=httpx2.Limits(max_connections=1)) as one_connection:
        done = {**AUTH, "Last-Event-ID": "done"}  # an EventSource that had `done` and reconnects anyway
        ended = one_connection.get(events_url(dev_stack, job["job_id"]), headers=done)
        assert ended.status_code == 204 and ended.content == b""
        assert "transfer-encoding" not in ended.headers and "content-length" not in ended.headers
        for _ in range(3):  # the same connection, as a client's next requests use it
            again = one_connection.get(f"{dev_stack.base_url}/v1/jobs/{job['job_id']}", headers=AUTH)
            assert again.status_code == 200 and again.json()["status"] == "completed"


def test_a_stream_cut_by_the_network_resumes_without_loss(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "cut me", "model": "sim-realtime", "max_tokens": 1000})
    chunks: list[dict[str, Any]] = []
    cut: Reader | None = None
    for _ in range(20):  # a stream may reach its own time limit before the cut: cut the next one
        last = {"Last-Event-ID": chunks[-1]["id"]} if chunks else {}
        reader = Reader(events_url(dev_stack, job["job_id"]), {**AUTH, **last})
        wait_for(lambda: reader.chunks or reader.ended.is_set(), timeout=60, what="a chunk")  # noqa: B023
        status, _, dropped = dev_stack.request(
            "POST", f"/_spool/drop-streams?job_id={job['job_id']}", key=None
        )
        assert status == 200
        reader.wait()
        chunks += reader.chunks
        if dropped["dropped"] and reader.done is None:
            cut = reader
            break
    assert cut is not None and cut.error is not None  # the client saw the connection break off
    rest, _ = follow(dev_stack, job["job_id"], chunks[-1]["id"])
    assert_whole(chunks + rest, wait_terminal(dev_stack, job["job_id"]))
    # it needs no key (a page on another origin uses it), so it cuts only a job it is told: a page
    # that knows no job id cuts nothing of anyone's
    for blind in ("/_spool/drop-streams", "/_spool/drop-streams?job_id=", "/_spool/drop-streams?job_id=x/"):
        status, _, refused = dev_stack.request("POST", blind, key=None)
        assert status == 400 and "job_id" in refused["error"]["message"], blind


def test_streams_end_at_their_time_limit_and_resume_to_the_whole_answer(dev_stack: RunningStack) -> None:
    tokens = int(STREAM_MAX_SECONDS * 50 * 2.5)  # sim-realtime writes 50 tokens/s: outlives ~2 streams
    _, _, job = create(dev_stack, {"message": "outlive", "model": "sim-realtime", "max_tokens": tokens})
    chunks, connections = follow(dev_stack, job["job_id"])
    assert connections >= 2
    assert_whole(chunks, wait_terminal(dev_stack, job["job_id"]))


@pytest.mark.parametrize("at_token", [1, 60])
def test_a_worker_crash_changes_nothing_the_reader_sees(dev_stack: RunningStack, at_token: int) -> None:
    request = {"message": "crash under a reader", "model": "sim-fast", "max_tokens": 300}
    _, _, clean = create(dev_stack, request)
    faulty = {**request, "metadata": {"simulate": {"fault": "crash", "at_token": at_token}}}
    _, _, job = create(dev_stack, faulty)
    chunks, _ = follow(dev_stack, job["job_id"])
    finished = wait_terminal(dev_stack, job["job_id"])
    assert finished["status"] == "completed"
    assert_whole(chunks, finished)
    assert finished["output"] == wait_terminal(dev_stack, clean["job_id"])["output"]


def test_links_events_needs_no_header_and_opens_nothing_else(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "link", "model": "sim-fast", "max_tokens": 100})
    _, _, other = create(dev_stack, {"message": "other", "model": "sim-fast", "max_tokens": 10})
    link = job["links"]["events"]
    assert link.startswith(f"{dev_stack.base_url}/v1/jobs/{job['job_id']}/events?token=")
    assert DEV_KEY not in link
    reader = Reader(link).wait()  # no Authorization header: what `new EventSource(link)` does
    assert_whole(reader.chunks, wait_terminal(dev_stack, job["job_id"]))
    token = link.split("token=", 1)[1]
    payload = token.split(".", 1)[0]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["k"].startswith("key_")  # handed to the caller's key: revoking it ends the token
    for path in (
        f"/v1/jobs/{other['job_id']}/events?token={token}",  # another job's stream
        f"/v1/jobs/{job['job_id']}?token={token}",  # the job itself (output, cancel...): API key only
        f"/v1/jobs/{job['job_id']}/chunks?token={token}",
    ):
        status, _, body = dev_stack.request("GET", path, key=None)
        assert (status, body["error"]["code"]) == (401, "unauthorized"), path
        assert body["error"]["suggestions"]
    other_tenant = dev_stack.request("GET", f"/v1/jobs/{job['job_id']}/events", key=OTHER_KEY)
    assert other_tenant[0] == 404
    # the stack's request log names the stream, never its token (a year's read access to the job)
    logged = [line for line in list(dev_stack.output) if f"/v1/jobs/{job['job_id']}/events?token=" in line]
    assert logged and not any(token in line for line in logged)


ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/sim-fast"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/job_x"),
    ("GET", "/v1/jobs/job_x/events"),
    ("POST", "/v1/jobs/job_x/cancel"),
    ("POST", "/v1/contexts"),
    ("PATCH", "/v1/contexts/ctx_x"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/tokens/count"),
    ("GET", "/v1/nothing-here"),
]
ORIGIN = "https://app.example.com"


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_answers_preflight_before_the_authorizer(
    dev_stack: RunningStack, method: str, path: str
) -> None:
    response = httpx2.options(
        dev_stack.base_url + path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, last-event-id",
        },
    )
    assert response.status_code in {200, 204}  # no key, yet not 401
    assert response.headers["access-control-allow-origin"] in {"*", ORIGIN}
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert method in response.headers["access-control-allow-methods"]


@pytest.mark.parametrize("key", [DEV_KEY, "sk-wrong", None])
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_answer_names_the_origin_and_exposes_the_headers(
    dev_stack: RunningStack, method: str, path: str, key: str | None
) -> None:
    headers = {"Origin": ORIGIN, **({"Authorization": f"Bearer {key}"} if key else {})}
    with httpx2.stream(
        method, dev_stack.base_url + path, headers=headers, json={} if method != "GET" else None
    ) as r:
        assert r.headers.get("access-control-allow-origin") in {"*", ORIGIN}, (r.status_code, dict(r.headers))
        exposed = {h.strip().lower() for h in r.headers.get("access-control-expose-headers", "").split(",")}
        assert "x-request-id" in exposed
        if r.status_code != 401 and path != "/v1/nothing-here":
            assert {"retry-after", "x-ratelimit-remaining-tokens"} <= exposed
