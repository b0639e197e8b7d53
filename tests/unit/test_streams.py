"""The local DynamoDB Streams event source: Lambda's filter patterns, and the job log of `make dev`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from spool.devstack.runtime import InvocationError
from spool.devstack.streams import JobTransitions, StreamPoller, matches
from spool.devstack.template import Template
from tests.support import ROOT

LIVE = {"dynamodb": {"NewImage": {"live": {"BOOL": [True]}}}}


def record(pk: str, **image: Any) -> dict[str, Any]:
    return {"eventName": "MODIFY", "dynamodb": {"Keys": {"pk": {"S": pk}}, "NewImage": image}}


def test_the_fanout_reads_the_chunk_stream_in_order_and_only_live_records() -> None:
    (event,) = Template.load(ROOT / "template.yaml").functions()["FanoutFunction"].stream_events
    assert event.table == "ChunksTable" and event.filters == (LIVE,)
    chunk = {"sequence_id": {"N": "3"}, "text": {"S": "x"}}
    assert matches(LIVE, record("t#job#1", **chunk, live={"BOOL": True}))
    assert not matches(LIVE, record("t#job#1", **chunk))  # a job nobody subscribed to: no invocation
    assert not matches(LIVE, record("t#job#1", **chunk, live={"BOOL": False}))
    assert not matches(LIVE, {"eventName": "REMOVE", "dynamodb": {"Keys": {}}})
    resources = Template.load(ROOT / "template.yaml").body["Resources"]
    properties = resources["FanoutFunction"]["Properties"]["Events"]["Chunks"]["Properties"]
    # One batch of the shard at a time, so each job's records come in order (see the test below)
    assert properties["ParallelizationFactor"] == event.parallelization == 1


class Streams:
    """One shard whose single read returns ``records`` (the stream client the poller calls)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def describe_stream(self, StreamArn: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        return {"StreamDescription": {"Shards": [{"ShardId": "shard-1"}]}}

    def get_shard_iterator(self, **_: Any) -> dict[str, Any]:
        return {"ShardIterator": "it-0"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:  # noqa: N803
        return {"Records": self.records if ShardIterator == "it-0" else [], "NextShardIterator": "it-1"}


def keyed(seq: int, *items: str) -> list[dict[str, Any]]:
    """The ``seq``-th change of each item (one key each), in order: what a lane keeps in order."""
    return [
        {"eventName": "MODIFY", "dynamodb": {"Keys": {"pk": {"S": i}}, "NewImage": {"n": {"N": str(seq)}}}}
        for i in items
    ]


def chunks(seq: int, *jobs: str) -> list[dict[str, Any]]:
    """The stream records of chunk ``seq`` of each job: items of their own, under the job's key."""
    return [
        {"eventName": "INSERT", "dynamodb": {"Keys": {"pk": {"S": j}, "sequence_id": {"N": str(seq)}}}}
        for j in jobs
    ]


def held(event: dict[str, Any]) -> list[tuple[str, int]]:
    """What an invocation got: each record's key and change (or chunk) number."""
    return [
        (
            r["dynamodb"]["Keys"]["pk"]["S"],
            int((r["dynamodb"]["Keys"].get("sequence_id") or r["dynamodb"]["NewImage"]["n"])["N"]),
        )
        for r in event["Records"]
    ]


def lanes_poller(batch_size: int = 100, parallelization: int = 4) -> StreamPoller:
    return StreamPoller(
        Streams([]),
        "arn",
        None,
        batch_size=batch_size,
        region="r",
        parallelization=parallelization,
        interval=0.01,
    )


def lanes_ended(poller: StreamPoller) -> bool:
    return not any(lane._thread.is_alive() for lane in poller._lane_workers.values())


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


class Fanout:
    """A function that holds each batch until ``release``: how many ran at once, and what each got."""

    def __init__(self, expected_at_once: int) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.barrier = threading.Barrier(expected_at_once, timeout=30)
        self.lock = threading.Lock()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        batch = held(event)
        with self.lock:
            self.batches.append(batch)
        self.barrier.wait()  # every lane's batch is in flight at the same time, or this times out
        return {"batchItemFailures": []}


def test_a_shard_is_read_in_parallel_lanes_with_each_items_records_in_one_lane_in_order() -> None:
    jobs = [f"t#job#{n}" for n in range(40)]
    records = [record for seq in range(1, 4) for record in keyed(seq, *jobs)]
    poller = StreamPoller(Streams(records), "arn", None, batch_size=1000, region="r", parallelization=4)
    lanes = poller._lanes_of(records)
    fanout = Fanout(len(lanes))
    poller._function = fanout  # type: ignore[assignment]
    assert poller._poll("it-0") == ("it-1", len(records))
    assert poller.idle(60)
    poller.stop()
    assert lanes_ended(poller)
    assert 1 < len(fanout.batches) <= 4  # several batches at once, at most the factor
    for job in jobs:
        (holding,) = [batch for batch in fanout.batches if any(pk == job for pk, _ in batch)]
        assert [seq for pk, seq in holding if pk == job] == [1, 2, 3]  # one lane, in order


def test_lanes_keep_order_per_item_only_so_the_fanout_reads_one_lane() -> None:
    """Lambda keeps order "at the item (partition and sort key) level" above a ParallelizationFactor
    of 1, and each chunk is an item of its own: the chunks of one job land in several lanes, which
    deliver them at once and out of order. So the fanout's stream runs one lane (the template)."""
    poller = StreamPoller(Streams([]), "arn", None, batch_size=100, region="r", parallelization=10)
    lanes = poller._lanes_of([record for seq in range(1, 11) for record in chunks(seq, "t#job#1")])
    assert len(lanes) > 1
    (event,) = Template.load(ROOT / "template.yaml").functions()["FanoutFunction"].stream_events
    assert event.parallelization == 1


class OneLaneStuck:
    """A function whose first invocation for ``stuck`` hangs until released, and whose first for
    ``failing`` fails (Lambda retries it): what each invocation got, in order."""

    def __init__(self, stuck: str, failing: str) -> None:
        self.stuck, self.failing = stuck, failing
        self.release = threading.Event()
        self.calls: list[list[tuple[str, int]]] = []
        self.lock = threading.Lock()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        batch = held(event)
        with self.lock:
            self.calls.append(batch)
            first_failing = sum(any(pk == self.failing for pk, _ in b) for b in self.calls) == 1
        if any(pk == self.stuck for pk, _ in batch):
            assert self.release.wait(30)
        if first_failing and any(pk == self.failing for pk, _ in batch):
            raise InvocationError("the invocation timed out")
        return {"batchItemFailures": []}


def test_a_slow_lane_holds_back_only_its_own_keys_and_a_failed_batch_is_retried_in_its_lane() -> None:
    poller = lanes_poller()
    jobs = [f"t#job#{n}" for n in range(40)]
    lane_of = {job: next(iter(poller._lanes_of(keyed(1, job)))) for job in jobs}
    stuck = jobs[0]
    failing = next(j for j in jobs if lane_of[j] not in (lane_of[stuck],))
    other = next(j for j in jobs if lane_of[j] not in (lane_of[stuck], lane_of[failing]))
    function = OneLaneStuck(stuck, failing)
    poller._function = function  # type: ignore[assignment]
    poller._streams = Streams(keyed(1, stuck, failing, other))
    poller._poll("it-0")
    poller._streams = Streams(keyed(2, stuck, failing, other))
    poller._poll("it-0")

    # the stuck lane holds its invocation; the others deliver both batches meanwhile, the failing
    # one retrying its first before its second
    def delivered(job: str) -> int:
        with function.lock:
            return sum(pk == job for call in function.calls for pk, _ in call)

    wait_for(lambda: delivered(other) >= 2 and delivered(failing) >= 3)
    seen = [[(pk, seq) for pk, seq in call if pk in (failing, other)] for call in function.calls]
    assert [seq for call in seen for pk, seq in call if pk == other] == [1, 2]
    # the failed batch again, then the rest (or both reads in one batch, failed and retried whole)
    assert [seq for call in seen for pk, seq in call if pk == failing] in ([1, 1, 2], [1, 2, 1, 2])
    # one invocation holds the stuck job: its first read, or both if the lane had not started yet
    (holding,) = [[seq for pk, seq in call if pk == stuck] for call in function.calls if (stuck, 1) in call]
    assert holding in ([1], [1, 2])
    assert sum(pk == stuck for call in function.calls for pk, _ in call) == len(holding)
    function.release.set()
    assert poller.idle(30)
    assert [seq for call in function.calls for pk, seq in call if pk == stuck] == [1, 2]
    poller.stop()
    assert lanes_ended(poller)


class Recording:
    """A function that records what it got; its first invocation raises ``first_raises`` (a failure
    that is not an invocation error: a container that could not start)."""

    def __init__(self, first_raises: BaseException | None = None) -> None:
        self.first_raises = first_raises
        self.calls: list[list[tuple[str, int]]] = []
        self.lock = threading.Lock()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            raising, self.first_raises = self.first_raises, None
            if raising is None:
                self.calls.append(held(event))
        if raising is not None:
            raise raising
        return {"batchItemFailures": []}

    def delivered(self, job: str) -> list[int]:
        with self.lock:
            return [seq for call in self.calls for pk, seq in call if pk == job]


def test_a_lane_whose_invocation_fails_unexpectedly_retries_its_batch_and_loses_nothing() -> None:
    poller = lanes_poller()
    function = Recording(first_raises=OSError("Too many open files"))
    poller._function = function  # type: ignore[assignment]
    for seq in (1, 2, 3):
        poller._streams = Streams(keyed(seq, "t#job#a"))
        poller._poll("it-0")
    assert poller.idle(30)
    poller.stop()
    assert function.delivered("t#job#a") == [1, 2, 3]


def test_a_paused_poller_holds_what_its_lanes_were_given_until_it_resumes() -> None:
    poller = lanes_poller()
    function = Recording()
    poller._function = function  # type: ignore[assignment]
    poller._streams = Streams(keyed(1, "t#job#a"))
    poller._poll("it-0")
    assert poller.idle(30) and function.delivered("t#job#a") == [1]
    poller.pause()
    poller._streams = Streams(keyed(2, "t#job#a"))
    poller._poll("it-0")  # read before the pause took hold: handed to the lane, which holds it
    assert not poller.idle(0.2)
    assert function.delivered("t#job#a") == [1]
    poller.resume()
    assert poller.idle(30) and function.delivered("t#job#a") == [1, 2]
    poller.stop()


def test_what_comes_to_a_lane_while_it_invokes_is_its_next_batch_up_to_the_batch_size() -> None:
    """As Lambda fills a lane's next batch: the reads that came while an invocation ran go in one
    invocation, in order, never more than the batch size."""
    poller = lanes_poller(batch_size=4, parallelization=2)
    function = OneLaneStuck(stuck="t#job#a", failing="none")
    poller._function = function  # type: ignore[assignment]
    poller._streams = Streams(keyed(1, "t#job#a"))
    poller._poll("it-0")
    wait_for(lambda: bool(function.calls))  # the first invocation holds the lane
    for seq in range(2, 8):
        poller._streams = Streams(keyed(seq, "t#job#a"))
        poller._poll("it-0")
    function.release.set()
    assert poller.idle(30)
    poller.stop()
    assert [[seq for _, seq in call] for call in function.calls] == [[1], [2, 3, 4, 5], [6, 7]]


class OneShardStream:
    """One shard holding ``records``; an iterator is the position of the next record to read."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def describe_stream(self, StreamArn: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        return {"StreamDescription": {"Shards": [{"ShardId": "s"}]}}

    def get_shard_iterator(self, **_: Any) -> dict[str, Any]:
        return {"ShardIterator": "0"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:  # noqa: N803
        start = int(ShardIterator)
        batch = self.records[start : start + Limit]
        return {"Records": batch, "NextShardIterator": str(start + len(batch))}


def numbered(*numbers: str, job: str = "t#job#j") -> list[dict[str, Any]]:
    """Stream records of one job with the sequence numbers ``itemIdentifier`` names."""
    return [
        {"eventName": "INSERT", "dynamodb": {"Keys": {"pk": {"S": job}}, "SequenceNumber": n}}
        for n in numbers
    ]


class ReportsFailed:
    """A fanout that reports ``failing(invocation, numbers)`` of each batch failed: what each got."""

    def __init__(self, failing: Callable[[int, list[str]], list[str]]) -> None:
        self.failing = failing
        self.invocations: list[list[str]] = []
        self.lock = threading.Lock()

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        numbers = [r["dynamodb"]["SequenceNumber"] for r in event["Records"]]
        with self.lock:
            self.invocations.append(numbers)
            failed = self.failing(len(self.invocations), numbers)
        return {"batchItemFailures": [{"itemIdentifier": n} for n in failed]}


def single_lane(records: list[dict[str, Any]], function: Any, retries: int | None = 10) -> StreamPoller:
    return StreamPoller(
        OneShardStream(records),
        "arn",
        function,
        batch_size=100,
        region="r",
        interval=0.001,
        max_retry_attempts=retries,
    )


def test_records_the_fanout_reports_failed_are_delivered_again() -> None:
    function = ReportsFailed(lambda invocation, numbers: numbers if invocation == 1 else [])
    poller = StreamPoller(
        OneShardStream(numbered("1")), "arn", function, batch_size=100, region="r", interval=0.001
    )
    for _ in range(3):
        poller._poll_shards()
    assert function.invocations == [["1"], ["1"]]


def test_the_records_before_the_lowest_failed_one_are_not_delivered_again() -> None:
    # reported out of order: the batch goes on from the lowest of them
    function = ReportsFailed(lambda invocation, numbers: ["40", "30"] if invocation == 1 else [])
    poller = single_lane(numbered("10", "20", "30", "40"), function)
    poller._poll_shards()
    poller._poll_shards()
    assert function.invocations == [["10", "20", "30", "40"], ["30", "40"]]


def test_a_failure_naming_no_record_of_the_batch_retries_the_whole_batch() -> None:
    function = ReportsFailed(lambda invocation, numbers: ["99"] if invocation == 1 else [])
    poller = single_lane(numbered("10", "20"), function)
    poller._poll_shards()
    assert function.invocations == [["10", "20"], ["10", "20"]]


def test_a_record_that_always_fails_is_given_up_after_the_retry_limit_and_the_poller_moves_on() -> None:
    function = ReportsFailed(lambda invocation, numbers: ["2"] if "2" in numbers else [])
    records = numbered("1", "2", "3")
    poller = single_lane(records, function, retries=2)
    poller._poll_shards()
    # once, then its two retries; then skipped, and the rest of its batch delivered
    assert function.invocations == [["1", "2", "3"], ["2", "3"], ["2", "3"], ["3"]]
    records.extend(numbered("4"))
    poller._poll_shards()
    assert function.invocations[4:] == [["4"]]


class FailsThenTimesOut(ReportsFailed):
    """Reports its batch's second record failed, then times out once (an invocation error)."""

    def __init__(self) -> None:
        super().__init__(lambda invocation, numbers: [numbers[1]] if invocation == 1 else [])

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        result = super().invoke(event)
        if len(self.invocations) == 2:
            raise InvocationError("the invocation timed out")
        return result


def test_a_failed_invocation_retries_what_was_left_to_deliver_as_it_is() -> None:
    function = FailsThenTimesOut()
    poller = single_lane(numbered("10", "20", "30"), function, retries=1)
    poller._poll_shards()
    # from the record reported failed, whole, until it goes through (a timeout is not counted against
    # the record's retries)
    assert function.invocations == [["10", "20", "30"], ["20", "30"], ["20", "30"]]
    poller._poll_shards()
    assert len(function.invocations) == 3  # nothing read twice


def test_a_lane_retries_from_the_lowest_record_reported_failed() -> None:
    poller = StreamPoller(
        OneShardStream([]), "arn", None, batch_size=100, region="r", parallelization=2, interval=0.001
    )
    function = ReportsFailed(lambda invocation, numbers: ["2"] if invocation == 1 else [])
    poller._function = function  # type: ignore[assignment]
    poller._streams = OneShardStream(numbered("1", "2", "3"))
    poller._poll("0")
    assert poller.idle(30)
    poller.stop()
    assert lanes_ended(poller)
    assert function.invocations == [["1", "2", "3"], ["2", "3"]]


def test_the_fanout_retries_a_failed_record_as_often_as_the_template_says() -> None:
    (event,) = Template.load(ROOT / "template.yaml").functions()["FanoutFunction"].stream_events
    resources = Template.load(ROOT / "template.yaml").body["Resources"]
    properties = resources["FanoutFunction"]["Properties"]["Events"]["Chunks"]["Properties"]
    assert event.maximum_retry_attempts == properties["MaximumRetryAttempts"] == 10


def test_exists_and_prefix_rules() -> None:
    assert matches({"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "t#job#"}]}}}}, record("t#job#1"))
    assert not matches({"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "t#idem#"}]}}}}, record("t#job#1"))
    assert matches({"dynamodb": {"OldImage": [{"exists": False}]}}, record("t#job#1"))
    with pytest.raises(ValueError, match="unsupported"):
        matches({"dynamodb": {"Keys": [{"numeric": [">", 1]}]}}, record("t#job#1"))


def test_job_transitions_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    log = JobTransitions(logging.getLogger("test.jobs"))
    queued = record("acme#job#job_1", status={"S": "queued"}, model_resolved={"S": "sim-fast"})
    running = record("acme#job#job_1", status={"S": "running"}, attempts={"N": "1"})
    done = record(
        "acme#job#job_1",
        status={"S": "failed"},
        attempts={"N": "1"},
        usage={"M": {"output_tokens": {"N": "12"}}},
        cost_nanos={"N": "4800"},
        error={"M": {"code": {"S": "provider_error"}}},
    )
    with caplog.at_level(logging.INFO, logger="test.jobs"):
        log([queued, record("acme#idem#abc", status={"S": "x"}), running, running])
        log([running, done])
    assert [r.getMessage() for r in caplog.records] == [
        "job job_1 queued (tenant acme, sim-fast)",
        "job job_1 running (attempt 1)",
        "job job_1 failed: 12 tokens out, $0.000005 (provider_error)",
    ]
