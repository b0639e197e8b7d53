"""The worker's entry point, in-process with a fake queue and runner: how it keeps its message hidden
while the runner takes the job's lease."""

from __future__ import annotations

import importlib.util
import threading
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.jobs.outcome import Outcome
from spool_core.jobs.runner import RunnerSettings
from tests.support import ROOT, load_event

DEADLINE_SECONDS = 30.0
CONTEXT = SimpleNamespace(
    function_name="worker",
    memory_limit_in_mb=256,
    invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:worker",
    aws_request_id="req-1",
    get_remaining_time_in_millis=lambda: 900_000,
)


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_app", ROOT / "worker/app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Queue:
    """``change_message_visibility`` that says when it was asked, then waits for ``release``."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        self.done: list[dict[str, Any]] = []

    def change_message_visibility(self, **request: Any) -> None:
        self.asked.set()
        assert self.release.wait(DEADLINE_SECONDS)
        self.done.append(request)


class Runner:
    """Takes the lease while the message's visibility is being extended: waits until it was asked."""

    def __init__(self, queue: Queue) -> None:
        self.settings = RunnerSettings(lease_ms=30_000)
        self.queue = queue
        self.saw_request_while_running = False

    def run(self, job_id: str, **_: Any) -> Outcome:
        self.saw_request_while_running = self.queue.asked.wait(DEADLINE_SECONDS)
        self.queue.release.set()  # the extension ends only after the runner is done
        return Outcome.DONE


def test_the_message_is_hidden_for_the_lease_while_the_lease_is_taken(
    worker: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SimpleNamespace(jobs_queue_url="https://sqs.local/jobs")
    queue = Queue()
    runner = Runner(queue)
    monkeypatch.setattr(bootstrap, "settings", lambda: config)
    monkeypatch.setattr(aws, "sqs", lambda settings: queue)
    built_before_asked: list[bool] = []

    def job_runner(tenant: Any, settings: Any) -> Runner:
        built_before_asked.append(not queue.asked.is_set())
        return runner

    monkeypatch.setattr(bootstrap, "job_runner", job_runner)
    event = load_event("worker")

    result = worker.lambda_handler(event, CONTEXT)

    assert result == {"batchItemFailures": []}
    assert built_before_asked == [True]  # a slow runner build (a cold registry) is not counted
    assert runner.saw_request_while_running  # asked for as the runner starts, not after it
    # ...and finished before the record's handler returned: hidden for the lease and a second.
    assert queue.done == [
        {
            "QueueUrl": "https://sqs.local/jobs",
            "ReceiptHandle": event["Records"][0]["receiptHandle"],
            "VisibilityTimeout": 31,
        }
    ]


def test_a_continuation_says_it_stalled_only_when_it_did() -> None:
    """A message of the worker before ``stalled`` existed refuses a field it does not know (its
    model forbids extras): the field is sent only on the rare hand-over after a stall."""
    import json

    from spool_core.adapters.jobs import SqsJobQueue
    from spool_core.queue import JobMessage

    sent: list[str] = []

    class Client:
        def send_message(self, QueueUrl: str, MessageBody: str) -> None:  # noqa: N803 - boto3's names
            sent.append(MessageBody)

    queue = SqsJobQueue(Client(), "url")  # type: ignore[arg-type]
    queue.send("job_1", "acme", continuation=2)
    queue.send("job_1", "acme", continuation=3, stalled_at=0)
    assert json.loads(sent[0]) == {"job_id": "job_1", "tenant_id": "acme", "continuation": 2}
    assert JobMessage.model_validate_json(sent[1]).stalled_at == 0
