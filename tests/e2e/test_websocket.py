"""Subscribing over WebSocket through the embedded stack: backlog then live, in order, resumable."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import connect

from spool import Client
from spool.client import Unauthorized
from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.e2e.test_client_and_cli import FlakyProxy


def new_job(stack: RunningStack, max_tokens: int = 120, **extra: Any) -> dict[str, Any]:
    body = {"message": "subscribe to me", "model": "sim-realtime", "max_tokens": max_tokens, **extra}
    status, _, job = stack.request(
        "POST", "/v1/jobs", body=body, headers={"Idempotency-Key": str(uuid.uuid4())}
    )
    assert status == 202
    return job


def receive(
    url: str, job_id: str, after: int, stop_after: int | None = None
) -> tuple[list[dict[str, Any]], Any]:
    """Subscribe and collect chunks until ``done`` (or until ``stop_after`` chunks, then disconnect)."""
    chunks: list[dict[str, Any]] = []
    with connect(f"{url}?api_key={DEV_KEY}") as socket:
        socket.send(json.dumps({"action": "subscribe", "job_id": job_id, "after": after}))
        while True:
            message = json.loads(socket.recv(timeout=30))
            if message["type"] == "done":
                return chunks, message
            assert message["type"] == "chunk", message
            chunks.append(message)
            if stop_after is not None and len(chunks) >= stop_after:
                return chunks, None


def final_job(stack: RunningStack, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = stack.request("GET", f"/v1/jobs/{job_id}")[2]
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job


def final_output(stack: RunningStack, job_id: str) -> str:
    job = final_job(stack, job_id)
    assert job["status"] == "completed", job
    return str(job["output"])


def assert_done_like_the_job(done: dict[str, Any], job: dict[str, Any]) -> None:
    """The WebSocket ``done`` carries what the SSE ``done`` does, as the job resource has it."""
    assert done == {
        "type": "done",
        "job_id": job["job_id"],
        "status": job["status"],
        "usage": job["usage"],
        "cost_usd": job["cost_usd"],
        "error": job["error"],
        "last_sequence_id": job["progress"]["last_sequence_id"],
    }


def test_two_subscribers_each_receive_the_whole_text(dev_stack: RunningStack) -> None:
    job = new_job(dev_stack)
    url = job["links"]["subscribe"]
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, receive(url, job["job_id"], 0)))
        for n in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    output = final_output(dev_stack, job["job_id"])
    for chunks, done in results.values():
        assert [c["sequence_id"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert "".join(c["text"] for c in chunks) == output
        assert done["status"] == "completed"
        assert done["usage"]["output_tokens"] == 120
        assert done["last_sequence_id"] == chunks[-1]["sequence_id"]
        assert done["cost_usd"] > 0
        assert_done_like_the_job(done, final_job(dev_stack, job["job_id"]))


def test_a_failed_jobs_done_carries_its_error_and_cost(dev_stack: RunningStack) -> None:
    simulate = {"simulate": {"fault": "fatal", "at_token": 40}}
    job = new_job(dev_stack, max_tokens=120, model="sim-fast", metadata=simulate)
    chunks, done = receive(job["links"]["subscribe"], job["job_id"], 0)
    failed = final_job(dev_stack, job["job_id"])
    assert failed["status"] == "failed"
    assert_done_like_the_job(done, failed)
    assert done["error"]["code"] == "provider_error"
    assert [c["sequence_id"] for c in chunks] == list(range(1, done["last_sequence_id"] + 1))
    assert "".join(c["text"] for c in chunks) == failed["output"]


def test_a_subscriber_that_reconnects_gets_exactly_the_rest(dev_stack: RunningStack) -> None:
    job = new_job(dev_stack, max_tokens=150)
    url = job["links"]["subscribe"]
    first, done = receive(url, job["job_id"], 0, stop_after=3)
    assert done is None
    rest, done = receive(url, job["job_id"], first[-1]["sequence_id"])
    ids = [c["sequence_id"] for c in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # backlog then live: no gap, no duplicate
    assert "".join(c["text"] for c in first + rest) == final_output(dev_stack, job["job_id"])
    assert done["status"] == "completed"


def test_subscribing_to_a_finished_job_sends_the_backlog_then_done(dev_stack: RunningStack) -> None:
    job = new_job(dev_stack, max_tokens=30)
    output = final_output(dev_stack, job["job_id"])
    chunks, done = receive(job["links"]["subscribe"], job["job_id"], 2)
    assert chunks[0]["sequence_id"] == 3
    assert done["status"] == "completed"
    assert output.endswith("".join(c["text"] for c in chunks))


def test_unknown_jobs_and_bad_keys(dev_stack: RunningStack) -> None:
    url = new_job(dev_stack, max_tokens=5)["links"]["subscribe"]
    with connect(f"{url}?api_key={DEV_KEY}") as socket:
        socket.send(json.dumps({"action": "subscribe", "job_id": "job_unknown", "after": 0}))
        message = json.loads(socket.recv(timeout=10))
        assert message["type"] == "error"
        assert message["error"]["code"] == "job_not_found"
        too_long = "j" * 65  # no id is that long: not found, as GET /v1/jobs/{id} answers it
        socket.send(json.dumps({"action": "subscribe", "job_id": too_long, "after": 0}))
        assert json.loads(socket.recv(timeout=10))["error"]["code"] == "job_not_found"
        socket.send(json.dumps({"action": "dance"}))
        assert json.loads(socket.recv(timeout=10))["error"]["code"] == "invalid_request"
        job_id = new_job(dev_stack, max_tokens=5)["job_id"]
        for after in (True, "3", 1.5, -1):  # `after` is a sequence id: a non-negative JSON integer
            socket.send(json.dumps({"action": "subscribe", "job_id": job_id, "after": after}))
            refused = json.loads(socket.recv(timeout=10))
            assert refused["error"]["code"] == "invalid_request", (after, refused)
            assert refused["error"]["details"]["fields"][0]["field"] == "after"
    with pytest.raises(Unauthorized):
        list(Client(dev_stack.base_url, "sk-wrong").subscribe("job_x"))


@pytest.fixture
def ws_proxy(dev_stack: RunningStack) -> Iterator[tuple[FlakyProxy, str]]:
    url = new_job(dev_stack, max_tokens=1)["links"]["subscribe"]
    proxy = FlakyProxy(int(url.rsplit(":", 1)[1]))
    yield proxy, f"ws://127.0.0.1:{proxy.port}"
    proxy.close()


class ProxiedClient(Client):
    """A client whose jobs' ``links.subscribe`` point at the proxy."""

    def __init__(self, stack: RunningStack, url: str) -> None:
        super().__init__(stack.base_url, DEV_KEY, sleep=lambda _: None)
        self._url = url

    def job(self, job_id: str, *, output: bool = True) -> dict[str, Any]:
        job = super().job(job_id, output=output)
        return {**job, "links": {**job["links"], "subscribe": self._url}}

    def seen(self, answer: Any) -> Any:
        super().seen(answer)
        if self.subscribe_url is not None:
            self.subscribe_url = self._url  # the link it remembers is the proxy's too
        return answer


def test_the_clients_stream_survives_a_killed_connection(
    dev_stack: RunningStack, ws_proxy: tuple[FlakyProxy, str]
) -> None:
    proxy, url = ws_proxy
    client = ProxiedClient(dev_stack, url)
    job = new_job(dev_stack, max_tokens=150)
    received = []
    for index, chunk in enumerate(client.subscribe(job["job_id"])):
        received.append(chunk)
        if index == 2:
            proxy.cut_next = 1
            proxy.kill_all()  # the live connection dies now
    assert proxy.cuts >= 1
    ids = [c["sequence_id"] for c in received]
    assert ids == list(range(1, len(ids) + 1))
    assert "".join(c["text"] for c in received) == final_output(dev_stack, job["job_id"])
