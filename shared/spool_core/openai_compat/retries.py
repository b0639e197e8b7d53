"""An OpenAI SDK's own retry of a request sent without an ``Idempotency-Key`` gets the job of the
request it retries, not a new, paid, one.

OpenAI's SDKs send no idempotency key, and they retry a request whose answer did not come within their
``timeout``, whose connection dropped, or that met a 5xx: each retry of a non-streamed chat completion
was a new job, the same answer generated and paid up to three times with ``max_retries=2``. Every SDK
Stainless generates (Python's and Node's included) says in each request how many times it was retried
(``x-stainless-retry-count``) and re-sends the same bytes. So a request that waits for its whole
answer is remembered for an hour once its job is made (a refused one stores nothing, and made no
job): the SHA-256 of its path and body -> the key it was given. A retry (a count of 1 or more) with
the same digest takes that key, and the idempotency of job creation does the rest: the same job,
finished or still running. A first attempt always gets a job of its own, so two identical requests a
caller meant as two are two jobs; only what an SDK re-sent itself is folded, and only when it can be
told whose retry it is: nothing in a retry names its first attempt, so when the same bytes were sent
as another first attempt within the hour (samples of one prompt, an evaluation's fan-out), the digest
is ambiguous and no retry of it is folded (a new job, as before), rather than every retry folded into
the job of the last of them (its callers all got one answer, and the other jobs were generated for
nobody). A streamed answer is not remembered: its status line is sent once the job exists, and an SDK
does not retry a stream that broke after it."""

from __future__ import annotations

import hashlib
import uuid
from typing import Protocol

from spool_core.jobs.service import check_idempotency_key
from spool_core.observability import logger

RETRY_COUNT_HEADER = "x-stainless-retry-count"
REMEMBERED_SECONDS = 3600  # past an SDK's retries of a request: 3 x its default 600 s timeout, and waits


class RetryKeys(Protocol):
    """The keys given to requests without one, by the digest of the request (the tenant's own)."""

    def remember(self, digest: str, key: str, now_s: int, expires_at_s: int) -> None:
        """Remember ``key`` for ``digest`` until ``expires_at_s``; when another key is remembered for it
        and not yet expired, mark the digest ambiguous instead (until ``expires_at_s``)."""

    def recall(self, digest: str, now_s: int) -> str | None:
        """The key remembered for ``digest``, not expired, not ambiguous; else None."""


def digest(path: str, body: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


def is_retry(retry_count: str | None) -> bool:
    try:
        return retry_count is not None and int(retry_count) >= 1
    except ValueError:
        return False


def key_for(
    sent: str | None, retry_count: str | None, request_digest: str, keys: RetryKeys, now_s: int
) -> tuple[str, bool]:
    """The request's idempotency key, and whether it is a new one (to remember for the retries): the
    one it sent; the one given to the request an SDK retry re-sends; else a fresh one. A failed read of
    the remembered key makes a fresh one (a new job, as before), never an error of a request that
    could be answered."""
    if sent:
        return check_idempotency_key(sent), False
    if is_retry(retry_count):
        try:
            known = keys.recall(request_digest, now_s)
        except Exception:
            logger.warning("could not read the key of the request this one retries", exc_info=True)
            known = None
        if known is not None:
            return known, False
    return f"openai-{uuid.uuid4()}", True


def remember(keys: RetryKeys, request_digest: str, key: str, now_s: int) -> None:
    """Best effort: a request whose key was not remembered is answered all the same, and only an SDK
    retry of it would be a new job."""
    try:
        keys.remember(request_digest, key, now_s, now_s + REMEMBERED_SECONDS)
    except Exception:
        logger.warning("could not remember the request's key for its retries", exc_info=True)
