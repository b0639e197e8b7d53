"""Bad input against a running stack, the way a hostile or careless caller sends it.

Every answer must be a 4xx (or a success) in Spool's error envelope, within a deadline, and a
rejected request must leave nothing behind. ``make fuzz`` starts an embedded stack and sends the
hand-made corpus (each a case seen to fail once), then thousands of generated requests and
WebSocket frames, and prints what broke. ``python -m bench.fuzz --url http://127.0.0.1:8000``
aims it at a running ``make dev``. The corpus is also a regression test (tests/e2e/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

DEEP = 5_000
HUGE = "9" * 41


def _deep(levels: int, leaf: str = "1") -> str:
    return "[" * levels + leaf + "]" * levels


def _deep_object(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


@dataclass(frozen=True)
class Probe:
    """One request. ``{job}``, ``{resp}`` and ``{ctx}`` in the path are a real job, response and
    context of the caller's tenant, so the request reaches past the "not found" checks."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    key: bool = True
    expect_rejected: bool = True  # a 4xx; a success is a failure of the probe

    def url(self, ids: Mapping[str, str]) -> str:
        return self.path.format(**ids)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _job(**extra: Any) -> dict[str, Any]:
    return {"model": "sim-fast", "message": "hi", "max_tokens": 5, **extra}


def _raw_job(metadata: str) -> bytes:
    return ('{"model": "sim-fast", "message": "hi", "max_tokens": 5, "metadata": ' + metadata + "}").encode()


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def hand_corpus() -> list[Probe]:
    """Requests that once answered 5xx, hung, or wrote something before being refused."""
    ctx_file = {"files": [{"path": "a.txt", "content": "x"}]}
    return [
        # Metadata DynamoDB cannot store: refused before anything is written
        Probe("job metadata NaN", "POST", "/v1/jobs", _raw_job('{"x": NaN}'), _key()),
        Probe("job metadata Infinity", "POST", "/v1/jobs", _raw_job('{"x": -Infinity}'), _key()),
        Probe("job metadata 1e400", "POST", "/v1/jobs", _raw_job('{"x": 1e400}'), _key()),
        Probe("job metadata 1e-200", "POST", "/v1/jobs", _raw_job('{"x": 1e-200}'), _key()),
        Probe(
            "job metadata 45-digit integer", "POST", "/v1/jobs", _raw_job('{"x": ' + "9" * 45 + "}"), _key()
        ),
        Probe("job metadata 500 KB", "POST", "/v1/jobs", _json(_job(metadata={"x": "a" * 500_000})), _key()),
        Probe("job metadata 40 levels", "POST", "/v1/jobs", _raw_job(_deep_object(40)), _key()),
        Probe("job metadata 5,000 levels", "POST", "/v1/jobs", _raw_job(_deep(DEEP)), _key()),
        Probe("job metadata not an object", "POST", "/v1/jobs", _raw_job("[1, 2]"), _key()),
        Probe("context metadata NaN", "POST", "/v1/contexts", b'{"files": [], "metadata": {"x": NaN}}'),
        Probe(
            "context metadata 3 MB",
            "POST",
            "/v1/contexts",
            _json({**ctx_file, "metadata": {"x": "a" * 3_000_000}}),
        ),
        Probe("context patch metadata NaN", "PATCH", "/v1/contexts/{ctx}", b'{"metadata": {"x": NaN}}'),
        # Numbers past what a query or a key can hold
        Probe("chunks after 41 digits", "GET", "/v1/jobs/{job}/chunks?after=" + HUGE),
        Probe("chunks limit 41 digits", "GET", "/v1/jobs/{job}/chunks?limit=" + HUGE),
        Probe("chunks wait 41 digits", "GET", "/v1/jobs/{job}/chunks?wait=" + HUGE),
        Probe("chunks after not a number", "GET", "/v1/jobs/{job}/chunks?after=1e3"),
        Probe(
            "resume last_sequence_id 10**40",
            "POST",
            "/v1/jobs/{job}/stream/resume",
            _json({"last_sequence_id": 10**40}),
        ),
        Probe(
            "resume last_sequence_id -1",
            "POST",
            "/v1/jobs/{job}/stream/resume",
            _json({"last_sequence_id": -1}),
        ),
        Probe("events after 41 digits", "GET", "/v1/jobs/{job}/events?after=" + HUGE),
        Probe(
            "events Last-Event-ID 41 digits", "GET", "/v1/jobs/{job}/events", headers={"Last-Event-ID": HUGE}
        ),
        Probe(
            "response starting_after 41 digits",
            "GET",
            "/v1/responses/{resp}?stream=true&starting_after=" + HUGE,
        ),
        Probe(
            "job max_tokens 41 digits",
            "POST",
            "/v1/jobs",
            _raw_job("{}").replace(b'"max_tokens": 5', b'"max_tokens": ' + HUGE.encode()),
            _key(),
        ),
        # Dates that do not exist
        Probe("usage until 2026-02-30", "GET", "/v1/usage?until=2026-02-30"),
        Probe("usage since 2026-13-01", "GET", "/v1/usage?since=2026-13-01"),
        Probe("usage since after until", "GET", "/v1/usage?since=2026-11-30&until=2026-11-01"),
        Probe("usage a century", "GET", "/v1/usage?since=1926-01-01&until=2026-01-01"),
        # Nesting past any parser's stack
        Probe(
            "tokens/count messages 5,000 levels",
            "POST",
            "/v1/tokens/count",
            b'{"model": "sim-fast", "messages": ' + _deep(DEEP).encode() + b"}",
        ),
        Probe(
            "chat messages 5,000 levels",
            "POST",
            "/v1/chat/completions",
            b'{"model": "sim-fast", "messages": ' + _deep(DEEP).encode() + b"}",
        ),
        Probe(
            "responses input 5,000 levels",
            "POST",
            "/v1/responses",
            b'{"model": "sim-fast", "input": ' + _deep(DEEP).encode() + b"}",
        ),
        Probe(
            "context files 5,000 levels", "POST", "/v1/contexts", b'{"files": ' + _deep(DEEP).encode() + b"}"
        ),
        # Bytes that are not UTF-8, on every route that takes a body
        *[
            Probe(
                f"invalid UTF-8 {method} {path}",
                method,
                path,
                b'{"model": "sim-fast", "message": "\xff\xfe"}',
                _key(),
            )
            for method, path in BODY_ROUTES
        ],
        Probe("lone surrogate", "POST", "/v1/jobs", b'{"model": "sim-fast", "message": "\\ud800"}', _key()),
        Probe("truncated JSON", "POST", "/v1/jobs", b'{"model": "sim-fast", "message": "h', _key()),
        Probe("JSON array body", "POST", "/v1/jobs", b"[]", _key()),
        Probe("JSON string body", "POST", "/v1/contexts", b'"files"'),
        Probe("empty body", "POST", "/v1/jobs", b"", _key()),
        # Headers
        Probe("Idempotency-Key 10 KB", "POST", "/v1/jobs", _json(_job()), {"Idempotency-Key": "k" * 10_000}),
        Probe(
            "Idempotency-Key with a tab",
            "POST",
            "/v1/jobs",
            _json(_job()),
            {"Idempotency-Key": "a\tb"},
            expect_rejected=False,
        ),
        Probe("no key", "GET", "/v1/models", key=False),
        # DESIGN.md: no key needed; the probe's shared cache keeps it from burning money
        Probe("deep health without a key", "GET", "/v1/health?deep=true", key=False, expect_rejected=False),
        # Paths
        Probe(
            "path traversal in context",
            "POST",
            "/v1/contexts",
            _json({"files": [{"path": "../etc/passwd", "content": "x"}]}),
        ),
        Probe("job id 10 KB", "GET", "/v1/jobs/" + "j" * 10_000),
        Probe("job id with NUL", "GET", "/v1/jobs/job_%00x"),
        Probe("unknown method", "FOO", "/v1/jobs"),
        Probe("PROPFIND", "PROPFIND", "/v1/models"),
        Probe("TRACE", "TRACE", "/v1/jobs/{job}"),
        Probe("context id 3 KB", "GET", "/v1/contexts/ctx_" + "c" * 3_000),
        Probe("response id 3 KB", "GET", "/v1/responses/resp_" + "r" * 3_000),
        # Requests the OpenAI schema accepts but a job cannot hold (found in review)
        Probe(
            "responses 1,001 input items",
            "POST",
            "/v1/responses",
            _json({"model": "sim-fast", "input": [{"role": "user", "content": "hi"}] * 1001}),
        ),
        Probe(
            "chat 2.1 MB of text parts",
            "POST",
            "/v1/chat/completions",
            _json(
                {
                    "model": "sim-fast",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 700_000}] * 3}],
                }
            ),
        ),
        Probe(
            "chat lone surrogate",
            "POST",
            "/v1/chat/completions",
            b'{"model": "sim-fast", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
        ),
        Probe(
            "chat metadata lone surrogate",
            "POST",
            "/v1/chat/completions",
            b'{"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}],'
            b' "metadata": {"k": "\\udc00"}}',
        ),
        Probe(
            "job messages over what a job holds (4 MB, past any model's window too)",
            "POST",
            "/v1/jobs",
            _json({"model": "sim-fast", "message": ("a" * 200 + "\n") * 21_000}),
            _key(),
        ),
        Probe("usage until year 1", "GET", "/v1/usage?until=0001-01-03", expect_rejected=False),
        # Listings: every bad limit, status or cursor is a 400, never a restart from the first page
        Probe("jobs limit 0", "GET", "/v1/jobs?limit=0"),
        Probe("jobs limit 101", "GET", "/v1/jobs?limit=101"),
        Probe("jobs limit not a number", "GET", "/v1/jobs?limit=x"),
        Probe("jobs limit 41 digits", "GET", "/v1/jobs?limit=" + HUGE),
        Probe("jobs unknown status", "GET", "/v1/jobs?status=finished"),
        Probe("jobs status 10 KB", "GET", "/v1/jobs?status=" + "s" * 10_000),
        Probe("jobs cursor not base64", "GET", "/v1/jobs?cursor=!!!.***"),
        Probe(
            "jobs cursor forged",
            "GET",
            "/v1/jobs?cursor=eyJ0IjoidGVuYW50LWIiLCJsIjoiam9icyIsInciOiIiLCJwIjoiOSJ9.AAAA",
        ),
        Probe("jobs cursor 10 KB", "GET", "/v1/jobs?cursor=" + "c" * 10_000),
        Probe("jobs cursor with NUL", "GET", "/v1/jobs?cursor=a%00b.c"),
        Probe("contexts limit 0", "GET", "/v1/contexts?limit=0"),
        Probe("contexts limit -1", "GET", "/v1/contexts?limit=-1"),
        Probe("contexts cursor forged", "GET", "/v1/contexts?cursor=e30.e30"),
        Probe("jobs list all defaults", "GET", "/v1/jobs?status=&cursor=", expect_rejected=False),
        # A HEAD answer has no body, even from a streaming route (the next request on the connection
        # read the stray end of a chunked body as its status line)
        Probe("HEAD on a streaming route", "HEAD", "/v1/chat/completions"),
        Probe("HEAD on an event stream", "HEAD", "/v1/jobs/{job}/events", expect_rejected=False),
        Probe("a request after the HEADs", "GET", "/v1/jobs/{job}/chunks?after=-1"),
    ]


BODY_ROUTES = [
    ("POST", "/v1/jobs"),
    ("POST", "/v1/contexts"),
    ("PATCH", "/v1/contexts/{ctx}"),
    ("POST", "/v1/tokens/count"),
    ("POST", "/v1/jobs/{job}/stream/resume"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
]
ROUTES = [
    *BODY_ROUTES,
    ("GET", "/v1/jobs"),
    ("GET", "/v1/contexts"),
    ("GET", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/{job}/chunks"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/contexts/{ctx}"),
    ("DELETE", "/v1/contexts/{nothing}"),
    ("POST", "/v1/contexts/uploads"),
    ("GET", "/v1/responses/{resp}"),
    ("POST", "/v1/responses/{resp}/cancel"),
    ("GET", "/v1/models"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
]
QUERY_NAMES = [
    "after", "limit", "wait", "since", "until", "deep", "stream", "starting_after", "token",
    "status", "cursor",
]  # fmt: skip
FIELDS = [
    "model", "message", "messages", "max_tokens", "temperature", "metadata", "context_id", "fallback",
    "files", "symbols", "upload_id", "ttl_seconds", "last_sequence_id", "limit", "wait", "input",
    "instructions", "stream", "background", "stream_options", "n", "tools", "max_output_tokens",
    "text", "path", "content", "role",
]  # fmt: skip


class Generator:
    """Random requests: real routes and fields with values of every wrong kind."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def value(self, depth: int = 0) -> Any:
        r = self.random
        kinds: list[Callable[[], Any]] = [
            lambda: None,
            lambda: r.choice([True, False]),
            lambda: r.choice([0, -1, 1, 2**31, 2**63, 10**38, 10**39, -(10**40)]),
            lambda: r.choice([0.5, -0.0, 1e-200, 1e300, 3.4e38]),
            lambda: r.choice(
                ["", "sim-fast", "default", "x" * r.randint(1, 3000), "\u202e\u0000", "🙂" * 50]
            ),
            lambda: r.choice(["../../x", "a/../b", "/abs", "C:\\x", 'a"b', "a\nb", "ctx_" + "a" * 26]),
        ]
        if depth < 4:
            kinds.append(lambda: [self.value(depth + 1) for _ in range(r.randint(0, 4))])
            kinds.append(lambda: {r.choice(FIELDS): self.value(depth + 1) for _ in range(r.randint(0, 4))})
        return r.choice(kinds)()

    def body(self) -> bytes:
        r = self.random
        choice = r.random()
        if choice < 0.55:  # a plausible object with wrong values
            obj = {r.choice(FIELDS): self.value() for _ in range(r.randint(0, 6))}
            if r.random() < 0.5:
                obj.setdefault("model", "sim-fast")
                obj.setdefault(r.choice(["message", "messages", "files", "input"]), self.value())
            return json.dumps(obj).encode()
        if choice < 0.65:
            return r.choice([b"NaN", b"{", b"[]", b'{"a":1}{', b"\x00\x01", b"\xff" * 10, b"null", b'"x"'])
        if choice < 0.75:
            return (
                _deep(r.randint(100, 20_000)) if r.random() < 0.5 else _deep_object(r.randint(20, 3_000))
            ).encode()
        if choice < 0.85:
            text = json.dumps({"model": "sim-fast", "message": "hi", "metadata": {"v": 1}})
            cut = r.randint(0, len(text))
            return text[:cut].encode() + bytes([r.randint(0x80, 0xFF)]) + text[cut:].encode()
        return json.dumps(self.value()).encode()

    def query(self) -> str:
        r = self.random
        if r.random() < 0.4:
            return ""
        pairs = []
        for _ in range(r.randint(1, 3)):
            value = r.choice(
                ["", "-1", "0", "1", HUGE, "1e3", "abc", "2026-02-30", "2026-11-01", "true", "%FF", "%00"]
            )
            pairs.append(f"{r.choice(QUERY_NAMES)}={value}")
        return "?" + "&".join(pairs)

    def headers(self) -> dict[str, str]:
        r = self.random
        headers: dict[str, str] = {}
        if r.random() < 0.5:
            headers["Idempotency-Key"] = r.choice([str(uuid.uuid4()), "", "k" * 300, "ключ"[:1] + "x"])
        if r.random() < 0.2:
            headers["Last-Event-ID"] = r.choice(["-1", HUGE, "abc", "3"])
        if r.random() < 0.2:
            headers["Content-Type"] = r.choice(
                ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
            )
        return {k: v for k, v in headers.items() if v.isascii()}

    def probe(self, index: int) -> Probe:
        r = self.random
        method, path = r.choice(ROUTES)
        if r.random() < 0.1:
            method = r.choice(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        body = self.body() if method in {"POST", "PUT", "PATCH"} else None
        return Probe(
            f"generated #{index}",
            method,
            path + self.query(),
            body,
            self.headers(),
            key=r.random() > 0.05,
            expect_rejected=False,
        )


BINARY_FRAME_CLOSE = 1003  # API Gateway takes text frames only and closes with this code


def websocket_frames() -> list[str | bytes]:
    return [
        '{"action": {}}',
        '{"action": []}',
        '{"action": null}',
        '{"action": "subscribe"}',
        '{"action": "subscribe", "job_id": {}}',
        '{"action": "subscribe", "job_id": "{job}", "after": ' + HUGE + "}",
        '{"action": "subscribe", "job_id": "{job}", "after": -1}',
        '{"action": "subscribe", "job_id": "{job}", "after": "x"}',
        '{"action": "nope"}',
        _deep(DEEP),
        '{"action": ' + _deep_object(3_000) + "}",
        "not json",
        "",
        b"\x00\xff binary",
        '{"action": "subscribe", "job_id": "' + "j" * 30_000 + '"}',  # under AWS's 32 KB frame limit
    ]


@dataclass
class Outcome:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)  # WebSocket close codes, expected ones
    failures: list[str] = field(default_factory=list)

    def fail(self, probe: str, problem: str) -> None:
        self.failures.append(f"{probe}: {problem}")


def envelope_problem(status: int, headers: Mapping[str, str], body: bytes, head: bool = False) -> str | None:
    """What is wrong with an answer, or None. Errors are Spool's envelope (OpenAI's routes use
    the same one with ``type`` and ``param`` added) and carry X-Request-Id; a HEAD answer has no body."""
    if status >= 500:
        return f"{status} {body[:200]!r}"
    if status < 400 or head:
        return None
    if "x-request-id" not in {k.lower() for k in headers}:
        return f"{status} without X-Request-Id"
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} not an envelope: {body[:200]!r}"
    if not isinstance(error, dict) or not error.get("code") or not error.get("message"):
        return f"{status} envelope without code/message: {body[:200]!r}"
    return None


class Fuzzer:
    def __init__(self, base_url: str, api_key: str, ws_url: str | None, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.ws_url = ws_url
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self.timeout = timeout
        self.ids: dict[str, str] = {}

    def close(self) -> None:
        self.http.close()

    def prepare(self) -> None:
        """A real job, response and context of the caller's tenant for the probes to aim at."""
        auth = {"Authorization": f"Bearer {self.api_key}"}
        job = self.http.post("/v1/jobs", json=_job(), headers={**auth, **_key()}).raise_for_status().json()
        ctx = (
            self.http.post("/v1/contexts", json={"files": [{"path": "a.txt", "content": "x"}]}, headers=auth)
            .raise_for_status()
            .json()
        )
        job_id = job["job_id"]
        self.ws_url = self.ws_url or job["links"].get("subscribe")
        self.ids = {
            "job": job_id,
            "resp": "resp_" + job_id.removeprefix("job_"),
            "ctx": ctx["context_id"],
            "nothing": "ctx_" + "a" * 26,
        }

    def send(self, probe: Probe, outcome: Outcome) -> None:
        headers = {"Content-Type": "application/json", **probe.headers}
        if probe.key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        outcome.sent += 1
        try:
            request = self.http.build_request(
                probe.method, probe.url(self.ids), content=probe.body, headers=headers
            )
            response = self.http.send(request, stream=True)
            try:
                # An event stream that was accepted is read no further than its first event.
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    body = next(response.iter_bytes(), b"")
                else:
                    body = response.read()
            finally:
                response.close()
        except httpx.TimeoutException:
            outcome.fail(probe.name, f"no answer within {self.timeout} s")
            return
        except httpx.HTTPError as exc:
            outcome.fail(probe.name, f"connection error {exc!r}")
            return
        outcome.statuses[response.status_code] += 1
        problem = envelope_problem(response.status_code, response.headers, body, probe.method == "HEAD")
        if problem is None and probe.expect_rejected and response.status_code < 400:
            problem = f"accepted ({response.status_code}) although it should be refused"
        if problem:
            outcome.fail(probe.name, problem)

    def send_frames(self, frames: list[str | bytes], outcome: Outcome) -> None:
        """Each frame on a fresh connection. A bad text frame gets an answer (an error frame, or
        nothing for a frame the API ignores) and an open connection afterwards, never a close; a
        binary frame closes the connection with 1003, as API Gateway does (it takes text frames
        only), and nothing else."""
        if not self.ws_url:
            return
        for index, frame in enumerate(frames):
            name = f"websocket frame #{index}"
            if isinstance(frame, str):
                frame = frame.replace("{job}", self.ids.get("job", ""))
            outcome.sent += 1
            try:
                with ws_connect(
                    f"{self.ws_url}?api_key={self.api_key}", open_timeout=self.timeout, max_size=2**22
                ) as ws:
                    ws.send(frame)
                    if isinstance(frame, bytes):
                        ws.recv(self.timeout)  # only the close may come: anything else is a failure
                        outcome.fail(name, "a binary frame was answered instead of closed with 1003")
                        continue
                    ws.ping().wait(self.timeout)  # still open: answered in order, not closed
                    outcome.statuses[101] += 1
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if isinstance(frame, bytes) and code == BINARY_FRAME_CLOSE:
                    outcome.closes[BINARY_FRAME_CLOSE] += 1
                else:
                    outcome.fail(name, f"connection closed {code if code is not None else '?'}")
            except TimeoutError:
                outcome.fail(name, "no answer")
            except OSError as exc:
                outcome.fail(name, f"connection error {exc!r}")

    def stored(self) -> dict[str, int]:
        """Items in each table and objects in each bucket of the local stack (its moto endpoint),
        once the prepared job has ended: what a rejected request must not change."""
        import boto3

        info = self.http.get("/_spool/stack").raise_for_status().json()
        auth = {"Authorization": f"Bearer {self.api_key}"}
        deadline = time.monotonic() + self.timeout
        while self.http.get(f"/v1/jobs/{self.ids['job']}", headers=auth).json()["status"] in {
            "queued",
            "running",
        }:
            if time.monotonic() > deadline:
                raise TimeoutError("the prepared job did not end")
            time.sleep(0.2)
        session = boto3.session.Session(
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106 - moto takes any
            region_name=info["region"],
        )
        dynamodb = session.client("dynamodb", endpoint_url=info["endpoint_url"])
        s3 = session.client("s3", endpoint_url=info["endpoint_url"])
        counts = {
            name: dynamodb.scan(TableName=table, Select="COUNT")["Count"]
            for name, table in info["resources"].items()
            if name in {"JobsTable", "ChunksTable", "ContextsTable"}
        }
        for bucket in s3.list_buckets()["Buckets"]:
            listing = s3.list_objects_v2(Bucket=bucket["Name"])
            counts[f"s3://{bucket['Name']}"] = listing["KeyCount"]
        return counts

    def run(self, probes: Iterator[Probe] | list[Probe], outcome: Outcome) -> Outcome:
        for probe in probes:
            self.send(probe, outcome)
        return outcome

    def campaign(self, requests: int, seed: int) -> Outcome:
        """The hand corpus (checking that what it refuses leaves nothing stored), then ``requests``
        generated requests, then the WebSocket frames."""
        outcome = Outcome()
        self.prepare()
        corpus = hand_corpus()
        before = self.stored()
        self.run([p for p in corpus if p.expect_rejected], outcome)
        after = self.stored()
        if before != after:
            outcome.fail("refused requests", f"left something stored: {before} -> {after}")
        self.run([p for p in corpus if not p.expect_rejected], outcome)
        generator = Generator(seed)
        self.run((generator.probe(i) for i in range(requests)), outcome)
        self.send_frames(websocket_frames(), outcome)
        return outcome


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    parser.add_argument("--url", help="a running stack (default: start an embedded one)")
    parser.add_argument("--ws-url", help="the stack's WebSocket URL (default: a job's links.subscribe)")
    parser.add_argument("--key", default=os.environ.get("SPOOL_API_KEY", "sk-fuzz"))
    parser.add_argument("--requests", type=int, default=2_000, help="generated requests (default 2,000)")
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args()
    if args.url:
        sys.exit(report(args.url, args.key, args.ws_url, args.requests, args.seed))
    os.environ["SPOOL_DEV_KEYS"] = f"{args.key}:fuzz"
    os.environ.setdefault("SPOOL_DEFAULT_MAX_CONCURRENT_JOBS", "1000")
    from spool.devstack.stack import EmbeddedStack

    with EmbeddedStack(port=0, ws_port=0) as stack:
        sys.exit(report(stack.base_url, args.key, None, args.requests, args.seed))


def report(base_url: str, key: str, ws_url: str | None, requests: int, seed: int) -> int:
    fuzzer = Fuzzer(base_url, key, ws_url)
    started = time.monotonic()
    try:
        outcome = fuzzer.campaign(requests, seed)
    finally:
        fuzzer.close()
    elapsed = time.monotonic() - started
    print(f"fuzz: {outcome.sent} requests and frames in {elapsed:.0f} s (seed {seed})")
    print("  statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(outcome.statuses.items())))
    if outcome.closes:
        closes = ", ".join(f"{code}: {n}" for code, n in sorted(outcome.closes.items()))
        print(f"  closes as API Gateway closes: {closes}")
    print(f"  failures: {len(outcome.failures)} (target 0: no 5xx, no hang, every error in the envelope)")
    for failure in outcome.failures[:50]:
        print("   - " + failure)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    main()
