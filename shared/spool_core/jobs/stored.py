"""A job's messages in its item, or in S3 when they are too large for it.

A job item is written several times in a job's life (admission, the lease's take and renewals, the
end's transaction), and DynamoDB bills each write by the item's size (a write unit per kilobyte, two
in a transaction): a 100 KB prompt kept on the item made every write of it ~100 units. Messages over
``INLINE_MESSAGES_BYTES`` are put in S3 once, at admission, and read once per attempt by the worker;
the item keeps their SHA-256. That also lifts the item's 400 KB limit: a request may hold up to
``MAX_MESSAGES_BYTES`` of messages (under Lambda's 6 MB request payload).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from spool_core.chat import Message
from spool_core.errors import DependencyUnavailable, Gone
from spool_core.jobs.model import Job, JobRequest
from spool_core.jobs.ports import RequestStore

INLINE_MESSAGES_BYTES = 8 * 1024
MAX_MESSAGES_BYTES = 4 * 1024 * 1024
# Without a store (a function that makes no jobs), what fits beside the rest of a job item
MAX_INLINE_ONLY_BYTES = 192 * 1024


def encoded_messages(request: JobRequest) -> bytes:
    """The messages as stored (their JSON): in S3 as they are, their length what a job may hold."""
    return json.dumps(
        [m.model_dump() for m in request.messages], separators=(",", ":"), ensure_ascii=False
    ).encode()


def offload(job: Job, store: Callable[[], RequestStore] | None, data: bytes) -> Job:
    """The job as its item keeps it: its messages in S3 when they are too large for the item (``job``
    itself otherwise). The item then holds no message at all, so that a reader that does not know
    ``messages_blob`` (code from before it, during a deploy or after a rollback) refuses the item
    rather than run the job on part of its prompt; a response's ``instructions`` (a first system
    message of at most ``INLINE_MESSAGES_BYTES``) are kept in its ``echo``. ``DependencyUnavailable``
    when S3 cannot take them (the create is retried with its key). ``data``: the job's messages as
    ``encoded_messages`` gives them."""
    if store is None or len(data) <= INLINE_MESSAGES_BYTES:
        return job
    try:
        sha256 = store().put(data)
    except Exception as exc:
        raise DependencyUnavailable(
            "The job's messages could not be stored", suggestions=["Retry with the same Idempotency-Key"]
        ) from exc
    echo, first = job.echo, job.request.messages[0]
    short = len(first.content.encode()) <= INLINE_MESSAGES_BYTES
    if echo and echo.get("instructions") and first.role == "system" and short:
        echo = {**echo, "instructions_text": first.content}
    request = job.request.model_copy(update={"messages": []})
    return job.model_copy(update={"request": request, "messages_blob": sha256, "echo": echo})


def messages_of(job: Job, store: Callable[[], RequestStore] | None) -> tuple[Message, ...]:
    """The job's messages, from its item or from S3."""
    if not job.messages_blob:
        return tuple(job.request.messages)
    if store is None:
        raise RuntimeError(f"job {job.job_id} keeps its messages in S3, and no store was given to read them")
    try:
        data = store().get(job.messages_blob)
    except KeyError:
        raise JobMessagesMissing(
            f"The messages of job {job.job_id} are no longer stored",
            details={"job_id": job.job_id},
            suggestions=["Create the job again with its messages"],
        ) from None
    return tuple(Message.model_validate(m) for m in json.loads(data))


class JobMessagesMissing(Gone):
    """A job's messages kept in S3 are gone (the bucket's expiry of the tenants' prefix, days after
    any job's last attempt): the job fails at once, naming why, rather than at each delivery."""

    code = "job_messages_missing"
