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
from spool_core.jobs.model import Job, JobRequest
from spool_core.jobs.ports import RequestStore

INLINE_MESSAGES_BYTES = 8 * 1024
MAX_MESSAGES_BYTES = 4 * 1024 * 1024
# Without a store (a function that makes no jobs), what fits beside the rest of a job item
MAX_INLINE_ONLY_BYTES = 192 * 1024


def messages_size(request: JobRequest) -> int:
    """The messages' size as stored (their JSON)."""
    return len(_encoded(request.messages))


def offload(request: JobRequest, store: Callable[[], RequestStore] | None) -> tuple[JobRequest, str | None]:
    """The request as the job item keeps it, and the SHA-256 of its messages when they went to S3.
    The item keeps the first message when it is a system message of at most ``INLINE_MESSAGES_BYTES``:
    a response shows it as its ``instructions`` (longer ones show as null) without a read of S3."""
    data = _encoded(request.messages)
    if store is None or len(data) <= INLINE_MESSAGES_BYTES:
        return request, None
    sha256 = store().put(data)
    first = request.messages[0]
    head = [first] if first.role == "system" and len(first.content.encode()) <= INLINE_MESSAGES_BYTES else []
    return request.model_copy(update={"messages": head}), sha256


def messages_of(job: Job, store: Callable[[], RequestStore] | None) -> tuple[Message, ...]:
    """The job's messages, from its item or from S3."""
    if not job.messages_blob:
        return tuple(job.request.messages)
    if store is None:
        raise RuntimeError(f"job {job.job_id} keeps its messages in S3, and no store was given to read them")
    return tuple(Message.model_validate(m) for m in json.loads(store().get(job.messages_blob)))


def _encoded(messages: list[Message]) -> bytes:
    return json.dumps([m.model_dump() for m in messages], separators=(",", ":"), ensure_ascii=False).encode()
