"""The local SQS event source mapping: what it deletes, and what it leaves for redelivery."""

from __future__ import annotations

import time
from typing import Any

from spool.devstack.template import SqsEvent
from spool.devstack.worker_loop import SqsEventSource, VisibilityKeeper, sqs_record
from tests.fakes import FakeFunction
from tests.support import wait_for


class FakeSqs:
    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.deleted: list[str] = []

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        batch, self.messages = (
            self.messages[: kwargs["MaxNumberOfMessages"]],
            self.messages[kwargs["MaxNumberOfMessages"] :],
        )
        return {"Messages": batch}

    def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
        self.deleted += [e["ReceiptHandle"] for e in Entries]


def message(n: int) -> dict[str, Any]:
    return {
        "MessageId": f"m{n}",
        "ReceiptHandle": f"r{n}",
        "Body": f'{{"n": {n}}}',
        "MD5OfBody": "x",
        "Attributes": {"ApproximateReceiveCount": "1"},
        "MessageAttributes": {"kind": {"StringValue": "job", "DataType": "String"}},
    }


def source(sqs: FakeSqs, function: FakeFunction, report: bool = True) -> SqsEventSource:
    event = SqsEvent("Jobs", "JobsQueue", batch_size=5, report_batch_item_failures=report)
    return SqsEventSource(sqs, "url", "arn:aws:sqs:us-east-1:1:q", function, event, region="us-east-1")  # type: ignore[arg-type]


def test_records_look_like_lambdas_sqs_event() -> None:
    record = sqs_record(message(1), "arn:q", "us-east-1")
    assert record["eventSource"] == "aws:sqs"
    assert record["messageAttributes"]["kind"]["stringValue"] == "job"
    assert record["attributes"]["ApproximateReceiveCount"] == "1"


def test_only_messages_that_succeeded_are_deleted() -> None:
    sqs = FakeSqs([message(i) for i in range(3)])
    function = FakeFunction(lambda e: {"batchItemFailures": [{"itemIdentifier": "m1"}]})
    assert source(sqs, function).poll_once() == 3
    assert sqs.deleted == ["r0", "r2"]
    assert len(function.events[0]["Records"]) == 3


def test_a_failed_invocation_deletes_nothing() -> None:
    sqs = FakeSqs([message(1), message(2)])

    def crash(event: Any) -> Any:
        raise RuntimeError("handler crashed")

    source(sqs, FakeFunction(crash)).poll_once()
    assert sqs.deleted == []


def test_unknown_failure_ids_fail_the_whole_batch() -> None:
    sqs = FakeSqs([message(1), message(2)])
    source(sqs, FakeFunction(lambda e: {"batchItemFailures": [{"itemIdentifier": "nope"}]})).poll_once()
    assert sqs.deleted == []


def test_without_report_batch_item_failures_a_returned_value_means_success() -> None:
    sqs = FakeSqs([message(1)])
    source(
        sqs, FakeFunction(lambda e: {"batchItemFailures": [{"itemIdentifier": "m1"}]}), report=False
    ).poll_once()
    assert sqs.deleted == ["r1"]


def test_an_empty_poll_invokes_nothing() -> None:
    function = FakeFunction(lambda e: None)
    assert source(FakeSqs([]), function).poll_once() == 0
    assert function.events == []


class SlowStartFunction(FakeFunction):
    """A function whose container takes a while to start: ``invoke`` waits until ``ready()`` says so,
    then calls ``on_start`` (as ``LocalFunction`` does once its container is up)."""

    reports_start = True

    def __init__(self, ready: Any) -> None:
        super().__init__(lambda e: {"batchItemFailures": []})
        self.ready = ready
        self.started = 0

    def invoke(
        self, event: dict[str, Any], timeout: float | None = None, wait: float = 30, on_start: Any = None
    ) -> Any:
        wait_for(self.ready, timeout=60, what="the container to be ready")
        self.started += 1
        if on_start is not None:
            on_start()
        return super().invoke(event)


class VisibilitySqs(FakeSqs):
    def __init__(self, messages: list[dict[str, Any]], visibility: int) -> None:
        super().__init__(messages)
        self.visibility = visibility
        self.extended: list[list[dict[str, Any]]] = []

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:  # noqa: N803
        return {"Attributes": {"VisibilityTimeout": str(self.visibility)}}

    def change_message_visibility_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> None:  # noqa: N803
        self.extended.append(Entries)


def test_messages_stay_invisible_while_their_container_starts() -> None:
    sqs = VisibilitySqs([message(1)], visibility=1)
    function = SlowStartFunction(ready=lambda: len(sqs.extended) >= 2)
    assert source(sqs, function).poll_once() == 1  # type: ignore[arg-type]
    assert function.started == 1
    assert sqs.extended[0] == [{"Id": "0", "ReceiptHandle": "r1", "VisibilityTimeout": 1}]
    assert sqs.deleted == ["r1"]


def test_a_warm_container_changes_no_visibility() -> None:
    sqs = VisibilitySqs([message(1)], visibility=30)
    function = SlowStartFunction(ready=lambda: True)
    source(sqs, function).poll_once()  # type: ignore[arg-type]
    assert sqs.extended == []
    assert sqs.deleted == ["r1"]


def test_the_keeper_refreshes_once_more_at_the_start_when_a_third_has_gone() -> None:
    now = [0.0]
    sqs = VisibilitySqs([], visibility=30)
    keeper = VisibilityKeeper(sqs, "url", [message(1)], 30, clock=lambda: now[0])
    keeper.start()
    now[0] = 11.0  # more than a third of the timeout since the messages were received
    keeper.stop()
    keeper.join(timeout=60)
    assert len(sqs.extended) == 1
    quick = VisibilityKeeper(sqs, "url", [message(2)], 30, clock=lambda: now[0])
    quick.start()
    quick.stop()
    quick.join(timeout=60)
    assert len(sqs.extended) == 1  # started at once: nothing to refresh


def test_a_failed_extension_is_not_fatal() -> None:
    class Gone(VisibilitySqs):
        def change_message_visibility_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> None:  # noqa: N803
            raise RuntimeError("the queue is gone")

    sqs = Gone([message(1)], visibility=1)
    attempts = [0]

    def ready() -> bool:
        attempts[0] += 1
        return attempts[0] > 30

    function = SlowStartFunction(ready=ready)
    source(sqs, function).poll_once()  # type: ignore[arg-type]
    assert sqs.deleted == ["r1"]


def test_one_poller_runs_up_to_its_concurrency_of_invocations_at_once() -> None:
    import threading

    sqs = FakeSqs([message(i) for i in range(6)])
    together = threading.Barrier(3, timeout=60)
    running: list[int] = []
    lock = threading.Lock()
    peak = [0]

    def work(event: Any) -> Any:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        together.wait()  # three invocations at once, or this times out
        with lock:
            running.pop()
        return {"batchItemFailures": []}

    event = SqsEvent("Jobs", "JobsQueue", batch_size=1, report_batch_item_failures=True)
    poller = SqsEventSource(
        sqs,
        "url",
        "arn:aws:sqs:us-east-1:1:q",
        FakeFunction(work),  # type: ignore[arg-type]
        event,
        region="us-east-1",
        concurrency=3,
    )
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    wait_for(lambda: len(sqs.deleted) == 6, timeout=60, what="every message processed")
    poller.stop()
    thread.join(timeout=60)
    poller.join(deadline=time.monotonic() + 60)
    assert sorted(sqs.deleted) == [f"r{i}" for i in range(6)]
    assert peak[0] == 3  # never more than the concurrency


def test_a_receive_error_is_retried_and_stop_ends_the_poller() -> None:
    import threading

    class Flaky(FakeSqs):
        calls = 0

        def receive_message(self, **kwargs: Any) -> dict[str, Any]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("the endpoint answered an error")
            return super().receive_message(**kwargs)

    sqs = Flaky([message(1)])
    poller = source(sqs, FakeFunction(lambda e: {"batchItemFailures": []}))
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    wait_for(lambda: sqs.deleted == ["r1"], timeout=60, what="the message, after the failed receive")
    poller.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
