"""Server-Sent Events over the chunk log, and the read-only token of links.events (no network)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spool_core.clock import from_epoch, rfc3339
from spool_core.errors import InvalidRequest
from spool_core.events import (
    DONE_ID,
    PING,
    EventsToken,
    StreamSettings,
    TimeUp,
    Wait,
    await_end,
    job_events,
    resume_point,
    texts,
)
from spool_core.jobs.cadence import FIRST_POLL_MS, Cadence
from spool_core.jobs.model import Chunk, Job
from spool_core.jobs.pages import ChunkPage

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def ms(self) -> int:
        return int(self.now * 1000)


class Log:
    """The three reads the stream makes of a JobService, over a list the test appends to."""

    cadence = Cadence(first_ms=200, max_ms=1500, tokens=64)  # the ramp (SPOOL_FLUSH_MAX_MS=1500)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.written: list[dict[str, Any]] = []
        self.status = "running"
        self.writes: list[tuple[float, str]] = []  # (at time, text): appended once the clock passes
        self.reads = 0
        self.read_seconds = 0.0  # how long each read of the log takes, on the clock

    def _apply(self) -> None:
        while self.writes and self.writes[0][0] <= self.clock.now:
            at, text = self.writes.pop(0)
            if text == "<end>":
                self.status = "completed"
            else:
                created_at = rfc3339(from_epoch(at))
                self.written.append(
                    {"sequence_id": len(self.written) + 1, "text": text, "created_at": created_at}
                )

    def chunks_after(self, after: int) -> list[dict[str, Any]]:
        return [c for c in self.written if c["sequence_id"] > after]

    # JobService's surface, as job_events uses it
    def chunk_page(self, job_id: str, *, after: int, limit: int) -> ChunkPage:
        self.reads += 1
        self.clock.sleep(self.read_seconds)
        self._apply()
        page = self.chunks_after(after)[:limit]
        done = self.status != "running" and len(self.chunks_after(after)) == len(page)
        chunks = [Chunk.model_validate({"tokens": 0, **chunk}) for chunk in page]
        status = "running" if self.status == "running" else "completed"
        return ChunkPage(job_id, status, chunks, chunks[-1].sequence_id if chunks else after, done)

    def get(self, job_id: str) -> Job:
        """The job item as ``done`` is built from it (status, progress, usage, cost, error)."""
        return Job.model_validate(
            {
                "job_id": job_id,
                "tenant_id": "t",
                "status": self.status,
                "request": {"message": "x", "model": "sim-fast"},
                "fingerprint": "f",
                "model_requested": "sim-fast",
                "model_resolved": "sim-fast",
                "created_at": "2026-11-27T07:00:00Z",
                "usage": {"output_tokens": 3},
                "cost_nanos": 10_000_000,
                "progress": {"last_sequence_id": len(self.written)},
            }
        )


def parse(stream: Iterator[str]) -> list[dict[str, Any]]:
    """The events as a client sees them: id, event name, data, and comments as {'comment': ...}."""
    events = []
    for block in "".join(stream).split("\n\n"):
        if not block:
            continue
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                event.setdefault("comment", value)
            elif name == "data":
                event["data"] = json.loads(value)
            else:
                event[name] = value
        events.append(event)
    return events


def timeline(
    log: Log,
    after: int = 0,
    settings: StreamSettings | None = None,
    budget: int | None = None,
    allowed: Callable[[], bool] | None = None,
) -> list[tuple[float, str]]:
    """(time sent, text) of everything the stream sends, waits played on the log's clock."""
    sent = []
    service: Any = log
    events = job_events(
        service,
        "job_1",
        after,
        settings,
        clock=log.clock,
        wall_ms=log.clock.ms,
        budget=budget,
        allowed=allowed,
    )
    for item in events:
        if isinstance(item, Wait):
            log.clock.sleep(item.seconds)
        else:
            sent.append((log.clock.now, item))
    return sent


def sent_chunks(log: Log, budget: int | None = None) -> list[tuple[float, dict[str, Any]]]:
    """(time sent, event) of each chunk event the stream sends."""
    sent = timeline(log, budget=budget)
    return [(at, e) for at, text in sent for e in parse(iter([text])) if e.get("event") == "chunk"]


def run(log: Log, after: int = 0, settings: StreamSettings | None = None) -> list[dict[str, Any]]:
    service: Any = log
    events = job_events(service, "job_1", after, settings, clock=log.clock, wall_ms=log.clock.ms)
    return parse(texts(events, log.clock.sleep))


def test_backlog_then_live_chunks_then_done_each_with_its_sequence_id() -> None:
    clock = Clock()
    log = Log(clock)
    log.written = [{"sequence_id": 1, "text": "Hello", "created_at": "1970-01-01T00:16:39.900Z"}]
    log.writes = [(1000.2, " world"), (1000.5, "!"), (1000.6, "<end>")]
    events = run(log)
    assert events[0] == {"retry": "1000", "comment": "connected"}
    chunks = [e for e in events if e.get("event") == "chunk"]
    assert [(e["id"], e["data"]) for e in chunks] == [
        ("1", {"sequence_id": 1, "text": "Hello"}),
        ("2", {"sequence_id": 2, "text": " world"}),
        ("3", {"sequence_id": 3, "text": "!"}),
    ]
    done = events[-1]
    assert (done["id"], done["event"]) == (DONE_ID, "done")
    assert done["data"] == {
        "job_id": "job_1",
        "status": "completed",
        "usage": {"estimated_tokens": 0, "input_tokens": 0, "output_tokens": 3},
        "cost_usd": 0.01,
        "error": None,
        "last_sequence_id": 3,
    }


def test_resuming_after_n_sends_exactly_the_rest() -> None:
    log = Log(Clock())
    log.written = [
        {"sequence_id": i, "text": f"t{i}", "created_at": "1970-01-01T00:16:39.000Z"} for i in range(1, 21)
    ]
    log.status = "completed"
    ids = [int(e["id"]) for e in run(log, after=17) if e.get("event") == "chunk"]
    assert ids == [18, 19, 20]


@pytest.mark.parametrize("read_seconds", [0.0, 0.4])
def test_an_idle_stream_sends_a_ping_at_least_every_ping_interval(read_seconds: float) -> None:
    """DESIGN.md: "at least every 15 s", also when each read of the log is slow (the ping waited for
    the read after its wake-up, and came 15.01-15.02 s after the last thing sent)."""
    log = Log(Clock())
    log.read_seconds = read_seconds
    log.writes = [(1040.0, "late"), (1040.0, "<end>")]
    sent = timeline(log, settings=StreamSettings(ping_seconds=15))
    pings = [at for at, text in sent if text == PING]
    assert len(pings) == 2
    times = [at for at, _ in sent]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 15
    assert sent[-1][1].startswith(f"id: {DONE_ID}")


def test_a_stream_ends_cleanly_at_its_time_limit_and_a_resume_continues_without_loss() -> None:
    clock = Clock()
    log = Log(clock)
    log.writes = [(1000.0 + i, f"w{i} ") for i in range(1, 31)] + [(1031.0, "<end>")]
    first = timeline(log, settings=StreamSettings(max_seconds=10))
    assert not any(text.startswith(f"id: {DONE_ID}") for _, text in first)
    assert first[-1][0] <= 1000.0 + 10 + 0.2  # ends at the limit even while chunks keep coming
    received = [e for e in parse(iter(t for _, t in first)) if e.get("event") == "chunk"]
    last = int(received[-1]["id"])
    rest = [e for e in run(log, after=last) if e.get("event") == "chunk"]
    ids = [int(e["id"]) for e in received + rest]
    assert ids == list(range(1, 31))
    assert "".join(e["data"]["text"] for e in received + rest) == "".join(f"w{i} " for i in range(1, 31))


class Key:
    """A stream's key as its check sees it (through the key cache): revoked from ``revoked_at`` on."""

    def __init__(self, clock: Clock, revoked_at: float) -> None:
        self.clock = clock
        self.revoked_at = revoked_at
        self.asked: list[float] = []

    def __call__(self) -> bool:
        self.asked.append(self.clock.now)
        return self.clock.now < self.revoked_at


@pytest.mark.parametrize("idle", [False, True], ids=["chunks-coming", "job-still-queued"])
def test_a_stream_ends_within_its_check_interval_once_its_key_is_revoked(idle: bool) -> None:
    clock = Clock()
    log = Log(clock)
    first = 1100.0 if idle else 1000.5  # a queued job: the stream waits (pings) with nothing to send
    log.writes = [(first + i, f"w{i} ") for i in range(60)] + [(first + 60, "<end>")]
    key = Key(clock, revoked_at=1020.0)
    settings = StreamSettings(ping_seconds=15, access_seconds=5)
    sent = timeline(log, settings=settings, allowed=key)
    events = parse(iter(t for _, t in sent))
    assert not any(e.get("event") == "done" for e in events)  # ended early: a reconnect gets 401
    assert 1020.0 <= clock.now <= 1020.0 + 5  # within one check interval of the revocation
    chunks = [e for e in events if e.get("event") == "chunk"]
    # the last event says why, in Spool's envelope, and where to go on from (an EventSource would
    # otherwise reconnect, unknowing, while another container's key cache still admits it)
    assert events[-1]["event"] == "error" and "id" not in events[-1]
    error = events[-1]["data"]["error"]
    assert error["code"] == "unauthorized" and "revoked" in error["message"]
    assert error["details"] == {"job_id": "job_1", "last_sequence_id": len(chunks)}
    assert f"'Last-Event-ID: {len(chunks)}'" in error["suggestions"][0]
    assert [int(e["id"]) for e in chunks] == list(range(1, len(chunks) + 1))  # nothing skipped
    assert len(chunks) == (0 if idle else 20)  # everything written while the key was good
    # asked once per interval, not on every look at the log (the cache makes a miss one read)
    assert key.asked == pytest.approx([1005.0, 1010.0, 1015.0, 1020.0], abs=0.2)


def test_a_stream_whose_key_stays_active_runs_to_done_and_one_without_a_check_never_asks() -> None:
    clock = Clock()
    log = Log(clock)
    log.writes = [(1000.5 + i, f"w{i} ") for i in range(12)] + [(1012.5, "<end>")]
    key = Key(clock, revoked_at=float("inf"))
    sent = timeline(log, settings=StreamSettings(access_seconds=5), allowed=key)
    events = parse(iter(t for _, t in sent))
    assert events[-1]["event"] == "done"
    assert len([e for e in events if e.get("event") == "chunk"]) == 12
    assert len(key.asked) == 2  # at 1005 and 1010
    log = Log(clock)
    log.writes = [(clock.now + 1, "w "), (clock.now + 2, "<end>")]
    assert parse(iter(t for _, t in timeline(log)))[-1]["event"] == "done"  # an events token: no check


def test_before_the_first_chunk_polling_is_fast_then_backs_off() -> None:
    log = Log(Clock())
    log.writes = [(1005.0, "a"), (1005.0, "<end>")]
    service: Any = log
    waits = []
    for item in job_events(service, "job_1", 0, clock=log.clock, wall_ms=log.clock.ms):
        if isinstance(item, Wait):
            waits.append(item.seconds)
            log.clock.sleep(item.seconds)
    assert waits[0] == pytest.approx(FIRST_POLL_MS / 1000)  # the first token is written at once: look often
    assert max(waits) == pytest.approx(0.1)
    assert log.reads < 5 / 0.05, log.reads  # fewer reads than a fixed 50 ms poll would make


def test_a_stream_looks_for_each_chunk_when_it_is_due() -> None:
    """Chunks written on the cadence (each a little after it was due, as a worker writes at the next
    token): the stream reads about once per chunk and sends each within a poll of its write."""
    log = Log(Clock())
    cadence, at, written = Log.cadence, 1000.0, {}
    for seq in range(1, 31):
        log.writes.append((at, f"c{seq} "))
        written[seq] = at
        at += cadence.interval_ms(seq) / 1000 + 0.02
    log.writes.append((at, "<end>"))
    chunks = sent_chunks(log)
    assert [int(e["id"]) for _, e in chunks] == list(range(1, 31))
    delays = [sent_at - written[int(e["id"])] for sent_at, e in chunks]
    assert max(delays) <= 0.1
    # at most a look every 250 ms (an answer may end early) and one when each chunk is due: a flat
    # 50-100 ms poll would read ~500 times over these 39 s
    assert log.reads <= (at - 1000.0) / 0.25 + 30


def test_an_answer_that_ends_before_its_budget_is_seen_within_a_quarter_second() -> None:
    log = Log(Clock())
    log.writes = [
        (1000.0, "a"),
        (1000.2, "b"),
        (1000.6, "c"),
        (1001.4, "d"),
        (1001.5, "e"),
        (1001.5, "<end>"),
    ]
    chunks = sent_chunks(log)
    assert chunks[-1][1]["id"] == "5" and chunks[-1][0] - 1001.5 <= 0.25 + 0.05  # not when 6 was due


def test_the_last_chunk_of_a_budget_is_expected_when_it_is_due() -> None:
    """A job's budget (max_tokens) tells a stream its last chunk comes sooner than the cadence's."""
    log = Log(Clock())
    log.writes = [
        (1000.0, "a"),
        (1000.2, "b"),
        (1000.6, "c"),
        (1001.4, "d"),
        (1001.7, "e"),
        (1001.7, "<end>"),
    ]
    tokens = {1: 1, 2: 10, 3: 20, 4: 40, 5: 15}
    totals = {n: sum(tokens[k] for k in tokens if k <= n) for n in tokens}
    original = log.chunks_after
    log.chunks_after = lambda after: [  # type: ignore[method-assign]
        {**c, "tokens": tokens[c["sequence_id"]], "tokens_total": totals[c["sequence_id"]]}
        for c in original(after)
    ]
    chunks = sent_chunks(log, budget=86)
    # 40 tokens in 800 ms, 15 left of 86: due 300 ms after chunk 4, not when 64 would be
    assert chunks[-1][1]["id"] == "5" and chunks[-1][0] - 1001.7 <= 0.05


def test_a_stream_sees_when_the_token_cap_writes_before_the_interval() -> None:
    """50 tokens/s: the ramp's chunks (200, 400, 800 ms), then 64-token chunks every 1.28 s, before the
    1.5 s interval; the stream learns the rate from the token counts and looks in time for each."""
    log = Log(Clock())
    at, written = 1000.0, {}
    schedule = [(0.0, 1), (0.2, 10), (0.4, 20), (0.8, 40)] + [(1.28, 64)] * 12
    for seq, (gap, tokens) in enumerate(schedule, start=1):
        at += gap
        log.writes.append((at, f"c{seq} "))
        written[seq] = (at, tokens)
    log.writes.append((at + 0.5, "<end>"))
    tokens_of = {seq: tokens for seq, (_, tokens) in written.items()}
    original = log.chunks_after
    log.chunks_after = lambda after: [  # type: ignore[method-assign]
        {**c, "tokens": tokens_of[c["sequence_id"]]} for c in original(after)
    ]
    chunks = sent_chunks(log)
    delays = [sent_at - written[int(e["id"])][0] for sent_at, e in chunks]
    assert len(delays) == len(schedule) and max(delays) <= 0.1, delays
    assert log.reads <= (at - 1000.0) / 0.25 + len(schedule)


@pytest.mark.parametrize(
    ("last_event_id", "after", "expected"),
    [
        (None, None, 0),
        ("", "5", 5),
        ("17", None, 17),
        ("17", "3", 17),  # the header (what EventSource sends on reconnect) wins over the query
        (DONE_ID, None, None),  # the client had `done`: nothing more (204)
    ],
)
def test_resume_point(last_event_id: str | None, after: str | None, expected: int | None) -> None:
    assert resume_point(last_event_id, after) == expected


@pytest.mark.parametrize(("last_event_id", "after"), [("abc", None), (None, "-1"), ("1" * 41, None)])
def test_a_resume_point_that_is_not_a_sequence_id_is_a_400_naming_the_field(
    last_event_id: str | None, after: str | None
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resume_point(last_event_id, after)
    field = "Last-Event-ID" if last_event_id else "after"
    assert caught.value.details["fields"][0]["field"] == field
    assert caught.value.suggestions


def test_an_events_token_opens_its_job_until_it_expires() -> None:
    signer = EventsToken(b"secret-one")
    token = signer.sign("tenant-a", "job_1", expires_at_s=2000)
    assert signer.verify(token, now_s=1999) == ("tenant-a", "job_1", None)
    assert signer.verify(token, now_s=2001) is None
    handed = signer.sign("tenant-a", "job_1", expires_at_s=2000, key_id="key_abc")  # to a caller's key
    assert signer.verify(handed, now_s=1999) == ("tenant-a", "job_1", "key_abc")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
        lambda t: t.split(".")[0],  # no signature
        lambda t: "x" + t,  # payload changed
        lambda t: "",
        lambda t: "...",
        lambda t: "%%%.%%%",
    ],
)
def test_a_forged_or_malformed_events_token_is_refused(mangle: Any) -> None:
    signer = EventsToken(b"secret-one")
    assert signer.verify(mangle(signer.sign("tenant-a", "job_1", 2000)), now_s=0) is None


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = EventsToken(b"secret-one").sign("tenant-a", "job_1", 2000)
    assert EventsToken(b"secret-two").verify(token, now_s=0) is None


def test_a_non_streamed_answer_waits_its_own_time_not_the_streams() -> None:
    """Streams are cut at ``max_seconds`` (and resumed); a plain answer has no resume, so it waits
    ``answer_max_seconds`` for the job to end, then says it is still running."""
    now = [0.0]

    class Running:
        def get(self, job_id: str) -> Any:
            return type("J", (), {"terminal": False})()

    settings = StreamSettings(max_seconds=3, answer_max_seconds=30)
    waited = 0.0
    for item in await_end(Running(), "job_x", settings, clock=lambda: now[0]):  # type: ignore[arg-type]
        if isinstance(item, Wait):
            now[0] += item.seconds
            waited = now[0]
        else:
            assert isinstance(item, TimeUp)
    assert 30 <= waited < 31


def test_a_non_streamed_answer_gives_up_before_the_openai_sdks_timeout_and_the_gateways() -> None:
    """An SDK that times out first sends the request again, without an Idempotency-Key: a new, paid
    job. Spool's 504 (``x-should-retry: false``) must come first, deployed and locally. So must it
    before API Gateway closes a streamed response that sent nothing for 5 minutes (a regional
    endpoint; an edge-optimized one closes it after 30 s, so the API is regional)."""
    import openai

    from spool.devstack.template import Template
    from spool_core.settings import Settings

    sdk_timeout = openai.DEFAULT_TIMEOUT.read
    assert sdk_timeout is not None
    idle_timeout = 300
    for waited in (StreamSettings().answer_max_seconds, Settings.model_fields["answer_max_seconds"].default):
        assert waited < min(sdk_timeout, idle_timeout)
    api = Template.load(Path(__file__).resolve().parents[2] / "template.yaml").resources["SpoolApi"]
    assert api["Properties"]["EndpointConfiguration"] == {"Type": "REGIONAL"}
