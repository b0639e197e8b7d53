"""Generation jobs through the embedded stack: idempotency, resume, cancel, crash, failure, DLQ."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from typing import Any

from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.support import wait_for


def new_key() -> str:
    return str(uuid.uuid4())


def create(
    stack: RunningStack, body: dict[str, Any], key: str | None = None
) -> tuple[int, dict[str, str], Any]:
    return stack.request("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": key or new_key()})


def wait_terminal(stack: RunningStack, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        status, _, job = stack.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200
        return job if job["status"] in {"completed", "failed", "cancelled"} else None

    job: dict[str, Any] = wait_for(ended, timeout=timeout, interval=0.2, what=f"job {job_id} to end")
    return job


def read_log(stack: RunningStack, job_id: str, after: int = 0) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    while True:
        status, _, page = stack.request("GET", f"/v1/jobs/{job_id}/chunks?after={after}&wait=10")
        assert status == 200
        chunks += page["chunks"]
        after = page["next_after"]
        if page["done"]:
            return chunks


def test_idempotency_over_http(dev_stack: RunningStack) -> None:
    body = {"message": "Explain the worker", "model": "sim-realtime", "max_tokens": 100}
    status, _, error = dev_stack.request("POST", "/v1/jobs", body=body)
    assert (status, error["error"]["code"]) == (400, "idempotency_key_required")

    key = new_key()
    status, headers, job = create(dev_stack, body, key)
    assert status == 202
    assert headers["Location"] == f"/v1/jobs/{job['job_id']}"
    assert job["status"] == "queued"
    assert job["model"] == {
        "requested": "sim-realtime",
        "resolved": "sim-realtime",
        "fallback_used": False,
        "segments": [{"model": "sim-realtime", "from_sequence_id": 1, "from_tokens": 0}],
    }
    assert set(job["links"]) == {"self", "chunks", "subscribe", "events"}

    status, _, error = create(dev_stack, body, key)
    assert status == 409
    assert error["error"]["code"] == "request_in_progress"
    assert error["error"]["details"]["job_id"] == job["job_id"]
    assert set(error["error"]["details"]["progress"]) == {"tokens_generated", "last_sequence_id"}

    status, _, error = create(dev_stack, {**body, "max_tokens": 101}, key)
    assert (status, error["error"]["code"]) == (422, "idempotency_key_reused")

    finished = wait_terminal(dev_stack, job["job_id"])
    status, _, replay = create(dev_stack, body, key)
    assert status == 200
    assert replay["job_id"] == job["job_id"]
    assert replay["output"] == finished["output"]


def test_twenty_concurrent_first_requests_make_one_job(dev_stack: RunningStack) -> None:
    key, body = new_key(), {"message": "concurrent", "model": "sim-fast", "max_tokens": 20}
    barrier = threading.Barrier(20)
    results: list[tuple[int, Any]] = []

    def first() -> None:
        barrier.wait()
        status, _, answer = create(dev_stack, body, key)
        results.append((status, answer))

    threads = [threading.Thread(target=first) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20  # every client got an answer
    assert sum(1 for status, _ in results if status == 202) == 1
    job_ids = {a["job_id"] if s in {200, 202} else a["error"]["details"]["job_id"] for s, a in results}
    assert len(job_ids) == 1
    assert {s for s, _ in results} <= {200, 202, 409}


def test_a_reader_that_stops_resumes_with_exactly_the_rest(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "resume me", "model": "sim-realtime", "max_tokens": 150})
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["sequence_id"] < 4:
        _, _, page = dev_stack.request(
            "GET", f"/v1/jobs/{job['job_id']}/chunks?after={len(seen)}&wait=10&limit=1"
        )
        seen += page["chunks"]
    # disconnect here; come back with the last sequence id held
    status, _, page = dev_stack.request(
        "POST",
        f"/v1/jobs/{job['job_id']}/stream/resume",
        body={"last_sequence_id": seen[-1]["sequence_id"], "wait": 10},
    )
    assert status == 200
    assert page["chunks"][0]["sequence_id"] == seen[-1]["sequence_id"] + 1
    rest = read_log(dev_stack, job["job_id"], after=seen[-1]["sequence_id"])
    finished = wait_terminal(dev_stack, job["job_id"])
    ids = [c["sequence_id"] for c in seen + rest]
    assert ids == list(range(1, len(ids) + 1))  # nothing lost, nothing repeated
    assert "".join(c["text"] for c in seen + rest) == finished["output"]
    assert finished["progress"]["last_sequence_id"] == ids[-1]


def test_cancel_mid_stream_keeps_the_partial_output(dev_stack: RunningStack) -> None:
    _, _, job = create(dev_stack, {"message": "long answer", "model": "sim-realtime", "max_tokens": 2000})
    read = dev_stack.request("GET", f"/v1/jobs/{job['job_id']}/chunks?after=2&wait=10")[2]
    assert read["chunks"]
    status, _, cancelled = dev_stack.request("POST", f"/v1/jobs/{job['job_id']}/cancel")
    assert status == 200
    assert cancelled["job_id"] == job["job_id"]
    finished = wait_terminal(dev_stack, job["job_id"], timeout=5)
    assert finished["status"] == "cancelled"
    log = read_log(dev_stack, job["job_id"])
    assert "".join(c["text"] for c in log) == finished["output"]
    assert finished["usage"]["output_tokens"] < 2000
    assert (
        dev_stack.request("POST", f"/v1/jobs/{job['job_id']}/cancel")[2]["status"] == "cancelled"
    )  # idempotent


def test_a_crash_finishes_with_the_same_text_as_a_clean_run(dev_stack: RunningStack) -> None:
    request = {"message": "crash safety", "model": "sim-fast", "max_tokens": 400}
    _, _, clean = create(dev_stack, request)
    faulty_body = {**request, "metadata": {"simulate": {"fault": "crash", "at_token": 150}}}
    _, _, faulty = create(dev_stack, faulty_body)
    clean_done = wait_terminal(dev_stack, clean["job_id"])
    crashed_done = wait_terminal(dev_stack, faulty["job_id"], timeout=60)
    assert crashed_done["status"] == "completed"
    log = read_log(dev_stack, faulty["job_id"])
    assert [c["sequence_id"] for c in log] == list(range(1, len(log) + 1))
    assert "".join(c["text"] for c in log) == crashed_done["output"] == clean_done["output"]


def test_a_fatal_error_fails_the_job_with_partial_output(dev_stack: RunningStack) -> None:
    body = {
        "message": "fatal",
        "model": "sim-fast",
        "max_tokens": 300,
        "metadata": {"simulate": {"fault": "fatal", "at_token": 100}},
    }
    _, _, job = create(dev_stack, body)
    failed = wait_terminal(dev_stack, job["job_id"])
    assert failed["status"] == "failed"
    error = failed["error"]
    assert error["code"] == "provider_error"
    assert error["suggestions"]
    assert error["request_id"]  # the worker invocation that failed it: its log says what happened
    log = read_log(dev_stack, job["job_id"])
    assert error["details"]["last_sequence_id"] == log[-1]["sequence_id"]
    assert failed["output"] == "".join(c["text"] for c in log)
    assert failed["usage"]["output_tokens"] == 100


def test_a_poison_message_reaches_the_dead_letter_queue_and_fails_its_job(dev_stack: RunningStack) -> None:
    body = {
        "message": "poison",
        "model": "sim-fast",
        "max_tokens": 300,
        "metadata": {"simulate": {"fault": "crash", "at_token": 10, "times": 99}},
    }
    _, _, job = create(dev_stack, body)
    failed = wait_terminal(dev_stack, job["job_id"], timeout=90)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "delivery_failed"
    assert failed["error"]["details"]["attempts"] >= 3
    assert failed["error"]["request_id"]  # the dead-letter consumer's invocation
    status, _, _ = dev_stack.request("GET", "/v1/health", key=None)
    assert status == 200


def test_admission_errors(dev_stack: RunningStack) -> None:
    status, _, error = create(dev_stack, {"message": "x", "model": "gpt-nope"})
    assert (status, error["error"]["code"]) == (400, "model_not_found")
    assert error["error"]["details"]["available"]
    status, _, error = create(dev_stack, {"message": "x", "context_id": "ctx_missing"})
    assert (status, error["error"]["code"]) == (404, "context_not_found")
    status, _, error = create(
        dev_stack, {"message": "x " * 70_000, "max_tokens": 65_000, "model": "sim-fast"}
    )
    assert (status, error["error"]["code"]) == (400, "context_too_large")
    assert {"tokens_requested", "tokens_limit", "tokens_over"} <= set(error["error"]["details"])
    status, _, error = dev_stack.request("GET", "/v1/jobs/job_unknown")
    assert (status, error["error"]["code"]) == (404, "job_not_found")
    status, _, error = dev_stack.request("GET", "/v1/jobs/job_unknown/chunks?after=x")
    assert status in {400, 404}


def test_a_status_poll_without_the_output_stays_small(dev_stack: RunningStack) -> None:
    """``?output=false``: the same resource without ``output``, under 2 KB whatever the output's
    size (a 5,000-token answer here), for polling while the job runs and after it ended."""
    status, _, job = create(dev_stack, {"message": "a long answer", "model": "sim-fast", "max_tokens": 5000})
    assert status == 202
    job_id = job["job_id"]
    url = f"/v1/jobs/{job_id}?output=false"
    request = urllib.request.Request(dev_stack.base_url + url)  # noqa: S310 - loopback
    request.add_header("Authorization", f"Bearer {DEV_KEY}")

    def raw() -> bytes:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return bytes(response.read())

    polled = json.loads(raw())
    assert "output" not in polled and polled["job_id"] == job_id
    full = wait_terminal(dev_stack, job_id)
    assert len(full["output"]) > 10_000
    ended = raw()
    assert len(ended) < 2048
    view = json.loads(ended)
    assert "output" not in view
    # the same resource but its output (links.events carries a token signed at each read)
    assert {k: v for k, v in full.items() if k not in {"output", "links"}} == {
        k: v for k, v in view.items() if k != "links"
    }
    assert set(view["links"]) == set(full["links"])
    assert dev_stack.request("GET", f"/v1/jobs/{job_id}?output=nope")[0] == 400
