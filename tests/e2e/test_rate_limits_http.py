"""429s over HTTP, bodies and headers exactly as the contract writes them, on a stack with small limits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import RunningStack, start_stack, stop_stack
from tests.support import wait_for

KEYS = {"sk-limit-a": "limits-a", "sk-limit-b": "limits-b", "sk-limit-c": "limits-c"}
RATE_HEADERS = ("X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens", "X-RateLimit-Reset-Tokens")


@pytest.fixture(scope="module")
def small_stack() -> Iterator[RunningStack]:
    stack = start_stack(
        {
            "SPOOL_DEV_KEYS": ",".join(f"{k}:{t}" for k, t in KEYS.items()),
            "SPOOL_DEFAULT_TOKENS_PER_MINUTE": "5000",
            "SPOOL_DEFAULT_MAX_CONCURRENT_JOBS": "2",
            "SPOOL_DEFAULT_DAILY_BUDGET_USD": "0.0015",
        }
    )
    yield stack
    stop_stack(stack)


def wait_done(stack: RunningStack, key: str, job_id: str) -> None:
    wait_for(
        lambda: stack.request("GET", f"/v1/jobs/{job_id}", key=key)[2]["status"] in {"completed", "failed"},
        what=f"job {job_id} to end",
    )


def create(stack: RunningStack, key: str, **body: Any) -> tuple[int, dict[str, str], Any]:
    payload = {"message": "limits", "model": "sim-fast", **body}
    return stack.request(
        "POST", "/v1/jobs", body=payload, key=key, headers={"Idempotency-Key": str(uuid.uuid4())}
    )


def test_job_responses_carry_the_rate_limit_headers(small_stack: RunningStack) -> None:
    status, headers, job = create(small_stack, "sk-limit-a", max_tokens=100)
    assert status == 202
    assert headers["X-RateLimit-Limit-Tokens"] == "5000"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) < 5000
    assert int(headers["X-RateLimit-Reset-Tokens"]) >= 0
    status, headers, _ = small_stack.request("GET", f"/v1/jobs/{job['job_id']}", key="sk-limit-a")
    assert status == 200
    assert all(name in headers for name in RATE_HEADERS)
    wait_done(small_stack, "sk-limit-a", job["job_id"])  # frees its concurrency slot


def test_token_limit_exceeded(small_stack: RunningStack) -> None:
    assert create(small_stack, "sk-limit-a", max_tokens=3000)[0] == 202
    status, headers, body = create(small_stack, "sk-limit-a", max_tokens=3000)
    assert status == 429
    error = body["error"]
    assert error["code"] == "token_limit_exceeded"
    assert {"tokens_requested", "tokens_remaining", "limit", "reset_at"} <= set(error["details"])
    assert error["details"]["limit"] == 5000
    assert error["details"]["tokens_requested"] > error["details"]["tokens_remaining"]
    assert error["details"]["reset_at"].endswith("Z")
    assert error["suggestions"]
    assert int(headers["Retry-After"]) >= 1
    assert all(name in headers for name in RATE_HEADERS)
    assert error["request_id"] == headers["X-Request-Id"]


def test_budget_exceeded(small_stack: RunningStack) -> None:
    assert create(small_stack, "sk-limit-b", max_tokens=2000)[0] == 202
    status, headers, body = create(small_stack, "sk-limit-b", max_tokens=2000)
    assert status == 429
    error = body["error"]
    assert error["code"] == "budget_exceeded"
    assert error["details"]["budget_usd"] == 0.0015
    assert error["details"]["spent_usd"] + error["details"]["estimated_cost_usd"] > 0.0015
    assert int(headers["Retry-After"]) >= 1


def test_too_many_concurrent_jobs(small_stack: RunningStack) -> None:
    for _ in range(2):
        assert create(small_stack, "sk-limit-c", model="sim-realtime", max_tokens=200)[0] == 202
    status, headers, body = create(small_stack, "sk-limit-c", model="sim-realtime", max_tokens=200)
    assert status == 429
    assert body["error"]["code"] == "too_many_concurrent_jobs"
    assert body["error"]["details"] == {"running": 2, "limit": 2}
    assert "Retry-After" in headers


def test_usage_reports_what_the_jobs_used(small_stack: RunningStack) -> None:
    _, _, job = create(small_stack, "sk-limit-a", max_tokens=50)
    while (
        small_stack.request("GET", f"/v1/jobs/{job['job_id']}", key="sk-limit-a")[2]["status"] != "completed"
    ):
        pass
    # the tenant whose job just ended (another test's jobs may still be running under load)
    status, headers, usage = small_stack.request("GET", "/v1/usage", key="sk-limit-a")
    assert status == 200
    assert usage["totals"]["jobs"] >= 1
    assert usage["by_model"]["sim-fast"]["output_tokens"] >= 50
    assert usage["limits"]["tokens_per_minute"]["limit"] == 5000
    assert all(name in headers for name in RATE_HEADERS)
    status, _, error = small_stack.request("GET", "/v1/usage?since=yesterday", key="sk-limit-a")
    assert (status, error["error"]["code"]) == (400, "invalid_request")
