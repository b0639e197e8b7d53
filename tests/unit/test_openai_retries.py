"""An OpenAI SDK's own retries of a request sent without an Idempotency-Key take the key of the
request they retry (spool_core.openai_compat.retries): what the SDK sends, and how a key is chosen."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from spool_core.openai_compat import retries
from tests.fakes import MemoryRetryKeys

pytestmark = pytest.mark.unit

NOW = 1_800_000_000
COMPLETION = {
    "id": "chatcmpl-job_abc",
    "object": "chat.completion",
    "created": NOW,
    "model": "sim-fast",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
}


def test_the_sdk_numbers_its_retries_and_sends_the_same_bytes_without_a_key() -> None:
    """What the design rests on, read from the SDK itself: a retry after a timeout says so, and is
    the same request byte for byte, with no idempotency key of the SDK's own."""
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if len(seen) < 3:
            raise httpx2.ReadTimeout("the answer took longer than the client's timeout", request=request)
        return httpx2.Response(200, json=COMPLETION)

    client = openai.OpenAI(
        base_url="http://spool.test/v1",
        api_key="sk",
        max_retries=2,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )
    client._calculate_retry_timeout = lambda *args, **kwargs: 0.0  # type: ignore[method-assign]
    messages: Any = [{"role": "user", "content": "hello"}]
    completion = client.chat.completions.create(model="sim-fast", messages=messages)
    assert completion.choices[0].message.content == "hi"
    assert [r.headers.get(retries.RETRY_COUNT_HEADER) for r in seen] == ["0", "1", "2"]
    assert len({r.content for r in seen}) == 1 and json.loads(seen[0].content)["messages"] == messages
    assert all("idempotency-key" not in r.headers for r in seen)
    digests = {retries.digest(r.url.path, r.content) for r in seen}
    assert len(digests) == 1


def test_a_key_sent_is_the_key_and_nothing_is_remembered_for_it() -> None:
    keys = MemoryRetryKeys()
    keys.remember("d", "openai-first", NOW, NOW + 60)
    assert retries.key_for("mine", "1", "d", keys, NOW) == ("mine", False)


def test_a_first_attempt_gets_a_new_key_even_when_the_same_request_was_remembered() -> None:
    """Two identical requests a caller sent as two are two jobs: only a retry takes the key."""
    keys = MemoryRetryKeys()
    keys.remember("d", "openai-first", NOW, NOW + 60)
    for count in (None, "0", "not-a-number", "-1"):
        key, new = retries.key_for(None, count, "d", keys, NOW)
        assert new and key.startswith("openai-") and key != "openai-first"


def test_a_retry_takes_the_key_of_the_request_it_retries_until_it_expires() -> None:
    keys = MemoryRetryKeys()
    retries.remember(keys, "d", "openai-first", NOW)
    assert retries.key_for(None, "1", "d", keys, NOW + 30) == ("openai-first", False)
    last = NOW + retries.REMEMBERED_SECONDS - 1
    assert retries.key_for(None, "2", "d", keys, last) == ("openai-first", False)
    key, new = retries.key_for(None, "1", "d", keys, NOW + retries.REMEMBERED_SECONDS)
    assert new and key != "openai-first"
    key, new = retries.key_for(None, "1", "other request", keys, NOW)
    assert new and key != "openai-first"


def test_a_retry_of_bytes_sent_as_two_first_attempts_is_not_folded() -> None:
    """Nothing in a retry names its first attempt: with two first attempts of the same bytes within
    the hour (samples of one prompt), every retry took the key of the last of them, and its callers
    all got that one job's answer. Ambiguous, a retry is a new job, as without the memory."""
    keys = MemoryRetryKeys()
    retries.remember(keys, "d", "openai-first", NOW)
    retries.remember(keys, "d", "openai-second", NOW + 5)
    key, new = retries.key_for(None, "1", "d", keys, NOW + 10)
    assert new and key not in {"openai-first", "openai-second"}
    last = NOW + 5 + retries.REMEMBERED_SECONDS
    assert retries.key_for(None, "1", "d", keys, last - 1)[1]  # ambiguous as long as either may retry
    retries.remember(keys, "d", "openai-third", last)  # both expired: the digest is one request's again
    assert retries.key_for(None, "1", "d", keys, last + 1) == ("openai-third", False)


class Broken:
    def remember(self, digest: str, key: str, now_s: int, expires_at_s: int) -> None:
        raise ConnectionError("the table is away")

    def recall(self, digest: str, now_s: int) -> str | None:
        raise ConnectionError("the table is away")


def test_a_store_that_fails_costs_a_retry_its_folding_never_its_answer() -> None:
    key, new = retries.key_for(None, "1", "d", Broken(), NOW)
    assert new and key.startswith("openai-")
    retries.remember(Broken(), "d", key, NOW)  # logged, not raised
