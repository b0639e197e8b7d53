"""Bad input through the whole stack: the hand-made corpus of requests that once answered 5xx,
hung or wrote something before being refused, generated requests, and bad WebSocket frames.
``make fuzz`` sends thousands more (bench/fuzz.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case

from bench.fuzz import BINARY_FRAME_CLOSE, Fuzzer, envelope_problem, websocket_frames
from tests.e2e.conftest import DEV_KEY, RunningStack, start_stack, stop_stack


@pytest.fixture(scope="module")
def quiet_stack() -> Iterator[RunningStack]:
    """A stack of its own: nothing else writes while the fuzzer counts what is stored."""
    stack = start_stack()
    yield stack
    stop_stack(stack)


def test_bad_input_gets_a_4xx_envelope_and_leaves_nothing_stored(quiet_stack: RunningStack) -> None:
    fuzzer = Fuzzer(quiet_stack.base_url, DEV_KEY, None)
    try:
        outcome = fuzzer.campaign(requests=300, seed=1127)
    finally:
        fuzzer.close()
    assert outcome.failures == []
    assert not any(status >= 500 for status in outcome.statuses)
    assert outcome.statuses[400] > 50  # the corpus reached the validation it is meant to test
    binary = sum(isinstance(frame, bytes) for frame in websocket_frames())
    assert outcome.closes[BINARY_FRAME_CLOSE] == binary  # closed as API Gateway closes them
    assert outcome.statuses[101] == len(websocket_frames()) - binary  # the rest left the connection open


def test_generated_requests_from_the_openapi_document(quiet_stack: RunningStack) -> None:
    """Every operation of the document the stack serves, with input schemathesis generates from
    it (valid and not): never a 5xx, every error in the envelope with its X-Request-Id."""
    schema = schemathesis.openapi.from_url(quiet_stack.base_url + "/v1/openapi.json")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Case) -> None:
            response = case.call(
                base_url=quiet_stack.base_url, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=30
            )
            statuses[response.status_code] += 1
            head = case.method.upper() == "HEAD"
            problem = envelope_problem(response.status_code, response.headers, response.content, head)
            if problem:
                failures.append(f"{case.method} {case.formatted_path}: {problem}")

        call()
    assert failures == []
    assert sum(statuses.values()) >= 10 * len(operations)
    assert statuses[400] and any(200 <= status < 300 for status in statuses)  # invalid and valid input
