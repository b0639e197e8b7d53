"""Lambda's SQS event source mapping, locally: long-poll the queue, invoke the function with a real
SQS event batch, delete only the messages that succeeded. Failed messages become visible again when
their visibility timeout ends, and SQS's redrive policy moves them to the dead-letter queue.

One poller per event source runs in the stack's process: it receives a batch whenever the function
may run one more invocation (up to its concurrency) and invokes the function's containers (other
processes) on a thread per batch, so a crashed invocation fails its batch without taking the poller
down.

While an invocation waits for its container (a cold start, or a free container), the poller keeps
the batch's messages invisible (``ChangeMessageVisibility`` every half visibility timeout), so a
slow init cannot hand the same message to a second worker: on AWS the queue's visibility timeout
(720 s by default) is far above any init; locally it is a few seconds. Once the handler has the
event, keeping the message is the handler's job (the worker extends its lease as it goes)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from spool.devstack.runtime import InvocationError, LocalFunction
from spool.devstack.template import SqsEvent

log = logging.getLogger("devstack.worker")


def sqs_record(message: Mapping[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """One record of the event Lambda builds from a received message."""
    attributes = {
        name: {
            "stringValue": value.get("StringValue"),
            "binaryValue": value.get("BinaryValue"),
            "stringListValues": value.get("StringListValues", []),
            "binaryListValues": value.get("BinaryListValues", []),
            "dataType": value["DataType"],
        }
        for name, value in (message.get("MessageAttributes") or {}).items()
    }
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes") or {}),
        "messageAttributes": attributes,
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


class SqsEventSource:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        queue_arn: str,
        function: LocalFunction,
        event: SqsEvent,
        *,
        region: str,
        poll_seconds: int = 1,
        concurrency: int = 1,
    ) -> None:
        self._visibility: int | None = None  # the queue's visibility timeout, read once
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._invocations: list[threading.Thread] = []
        self._sqs = sqs
        self._queue_url = queue_url
        self._queue_arn = queue_arn
        self._function = function
        self._event = event
        self._region = region
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Receive batches while a container may take one, and invoke the function with each on a
        thread of its own: up to ``concurrency`` invocations at once, one receive at a time (an idle
        queue costs one long poll per ``poll_seconds``, however many containers the function may run)."""
        while not self._stop.is_set():
            self._slots.acquire()
            if self._stop.is_set():
                self._slots.release()
                return
            try:
                messages = self._receive()
            except Exception:  # the endpoint went away (the stack is stopping) or answered an error
                self._slots.release()
                if self._stop.is_set():
                    return
                log.exception("polling %s failed; retrying", self._queue_arn.rsplit(":", 1)[-1])
                self._stop.wait(1.0)
                continue
            if not messages:
                self._slots.release()
                continue
            invocation = threading.Thread(
                target=self._invoke_and_release, args=(messages,), name="sqs-invoke", daemon=True
            )
            with self._lock:
                self._invocations = [t for t in self._invocations if t.is_alive()]
                self._invocations.append(invocation)
            invocation.start()

    def _invoke_and_release(self, messages: list[dict[str, Any]]) -> None:
        try:
            self._process(messages)
        except Exception:
            log.exception("processing %d message(s) failed; they return to the queue", len(messages))
        finally:
            self._slots.release()

    def join(self, deadline: float) -> None:
        """Wait (until ``deadline``, a ``time.monotonic()``) for the invocations in flight to end."""
        with self._lock:
            invocations = list(self._invocations)
        for invocation in invocations:
            invocation.join(timeout=max(0.0, deadline - time.monotonic()))

    def _receive(self) -> list[dict[str, Any]]:
        response = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=min(self._event.batch_size, 10),
            WaitTimeSeconds=self._poll_seconds,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def poll_once(self) -> int:
        """Receive one batch and process it on this thread; returns how many messages came."""
        messages = self._receive()
        if messages:
            self._process(messages)
        return len(messages)

    def _process(self, messages: list[dict[str, Any]]) -> None:
        if self._stop.is_set():
            self._make_visible(messages)  # received as the stack stops: leave them for the next start
            return
        event = {"Records": [sqs_record(m, self._queue_arn, self._region) for m in messages]}
        keeper: VisibilityKeeper | None = None
        try:
            if getattr(self._function, "reports_start", False):  # it says when its handler starts
                keeper = VisibilityKeeper(self._sqs, self._queue_url, messages, self.visibility_timeout())
                keeper.start()
                result = self._function.invoke(event, on_start=keeper.stop)
            else:
                result = self._function.invoke(event)
        except InvocationError as exc:
            if self._stop.is_set():  # the stack stopped the container: the messages stay queued
                self._make_visible(messages)
                return
            # The whole batch failed: nothing is deleted, every message returns after its visibility timeout.
            log.warning("%s; %d message(s) return to the queue", exc, len(messages))
            return
        finally:
            if keeper is not None:
                keeper.stop()
        failed = self._failed_ids(result, messages)
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self._sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )

    def visibility_timeout(self) -> int:
        if self._visibility is None:
            attributes = self._sqs.get_queue_attributes(
                QueueUrl=self._queue_url, AttributeNames=["VisibilityTimeout"]
            )["Attributes"]
            self._visibility = int(attributes.get("VisibilityTimeout", 30))
        return self._visibility

    def _make_visible(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            with contextlib.suppress(Exception):
                self._sqs.change_message_visibility(
                    QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )

    def _failed_ids(self, result: Any, messages: list[dict[str, Any]]) -> set[str]:
        if not self._event.report_batch_item_failures:
            return set()
        ids = {m["MessageId"] for m in messages}
        failures = (result or {}).get("batchItemFailures", []) if isinstance(result, dict) else []
        failed = {str(f.get("itemIdentifier")) for f in failures}
        if not failed <= ids:
            # Lambda treats an unknown identifier as a failure of the whole batch.
            log.error("batchItemFailures names unknown messages; the whole batch fails")
            return ids
        return failed


class VisibilityKeeper:
    """Keeps received messages invisible until ``stop()``: every half visibility timeout, their
    visibility is set to the whole timeout again, and once more at ``stop()`` if a third of it has
    gone by (so the handler starts with most of a timeout ahead, whatever its wait took)."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        messages: list[dict[str, Any]],
        visibility: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._messages = messages
        self._visibility = visibility
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.extensions = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqs-visibility", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        refreshed = self._clock()  # when the messages were received, about
        while not self._stopped.wait(max(0.5, self._visibility / 2)):
            self._extend()
            refreshed = self._clock()
        if self._clock() - refreshed > self._visibility / 3:
            self._extend()

    def _extend(self) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": self._visibility}
            for i, m in enumerate(self._messages)
        ]
        try:
            self._sqs.change_message_visibility_batch(QueueUrl=self._queue_url, Entries=entries)
            self.extensions += 1
        except Exception:  # the stack is stopping, or the messages are gone
            log.debug("could not extend the visibility of %d message(s)", len(entries), exc_info=True)
