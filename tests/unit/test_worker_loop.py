"""The local SQS event source mapping: what it deletes, and what it leaves for redelivery."""

from __future__ import annotations

from typing import Any

from spool.devstack.template import SqsEvent
from spool.devstack.worker_loop import SqsEventSource, sqs_record
from tests.fakes import FakeFunction


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
