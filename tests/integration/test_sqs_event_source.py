"""The local event source mapping against moto's SQS: partial failures, visibility timeout, redrive."""

from __future__ import annotations

from typing import Any

from spool.devstack.provision import StackDescription
from spool.devstack.template import SqsEvent
from spool.devstack.worker_loop import SqsEventSource
from tests.integration.conftest import client
from tests.support import wait_for


class Recorder:
    def __init__(self, fail_bodies: set[str]) -> None:
        self.fail_bodies = fail_bodies
        self.seen: list[str] = []

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for record in event["Records"]:
            self.seen.append(record["body"])
            if record["body"] in self.fail_bodies:
                failures.append({"itemIdentifier": record["messageId"]})
        return {"batchItemFailures": failures}


def drain(url: str, sqs: Any) -> None:
    sqs.purge_queue(QueueUrl=url)


def test_failed_messages_are_retried_then_dead_lettered(stack: StackDescription) -> None:
    sqs = client("sqs", stack)
    queue, dead = stack.refs["JobsQueue"], stack.refs["JobsDeadLetterQueue"]
    drain(queue, sqs)
    drain(dead, sqs)
    for body in ("ok-1", "poison", "ok-2"):
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    function = Recorder({"poison"})
    event = SqsEvent("Jobs", "JobsQueue", batch_size=5, report_batch_item_failures=True)
    source = SqsEventSource(
        sqs,
        queue,
        stack.attributes["JobsQueue.Arn"],
        function,
        event,  # type: ignore[arg-type]
        region=stack.region,
        poll_seconds=0,
    )

    def dead_lettered() -> int:
        source.poll_once()
        attributes = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["ApproximateNumberOfMessages"])
        return int(attributes["Attributes"]["ApproximateNumberOfMessages"])

    wait_for(dead_lettered, timeout=30, interval=0.2, what="the poison message to be dead-lettered")

    assert function.seen.count("ok-1") == 1
    assert function.seen.count("ok-2") == 1
    assert function.seen.count("poison") == 2  # MaxReceiveCount=2, then the redrive policy moves it
    moved = sqs.receive_message(QueueUrl=dead, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in moved] == ["poison"]
    sqs.delete_message(QueueUrl=dead, ReceiptHandle=moved[0]["ReceiptHandle"])
    attributes = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
