"""The WebSocket fanout's DynamoDB requests per chunk, with nobody subscribed and with one subscriber.

First, deliveries as AWS makes them for a streamed job (MaximumBatchingWindowInSeconds 0: each chunk
is a stream batch of its own): 96 chunks, each followed by the fanout's delivery of its record, then
the job's end mark, in this process against the stack's DynamoDB, every call counted. Then, end to
end: a 1,000-token job at sim-realtime (50 tokens/s, at the chunk cadence) runs to the end through
the local stack, whose stream poller batches as timing allows (so these vary from run to run); the
fanout function's containers count their DynamoDB calls (reads: GetItem, Query, BatchGetItem;
writes: PutItem, UpdateItem, DeleteItem, BatchWriteItem, TransactWriteItems), divided by the job's
chunks. With a subscriber, the WebSocket
function's calls ($connect, then the subscribe and its backlog: the chunks written before it ran) are
added for a second figure, all the requests the subscriber cost per chunk.

``python -m bench fanout``; the "before" figures were measured with this same bench on the version
that locked, read, advanced and unlocked per chunk (commit 71c780f).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.client
from websockets.sync.client import connect

from bench.jobs import _NoQueue, call, function_calls, wait_done, wait_queue_drained
from spool.devstack.stack import EmbeddedStack
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.dynamodb import ScopedTable
from spool_core.adapters.websocket import DynamoSubscriptionStore
from spool_core.jobs.model import Chunk, EndMark, JobRequest
from spool_core.subscriptions import Fanout
from spool_core.tenancy import Tenant, TenantScope

READS = ("GetItem", "Query", "BatchGetItem")
WRITES = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")
TOKENS = 1000
TARGET = {0: (1.0, 0.0), 1: (1.0, 1.0)}  # one Query a batch; one conditional claim a message (issue 16)


CHUNKS = 96  # deliveries of one chunk each (a 1,000-token answer flushed every 200 ms, before the cadence)
# Measured with this bench on 71c780f (lock, read the job, read the log, advance, unlock, look
# again): per chunk (reads, writes), and the job's end with one subscriber.
BEFORE_PER_CHUNK = {0: (1.0, 0.0), 1: (6.0, 5.0)}
BEFORE_END = (3, 4)


@contextlib.contextmanager
def dynamodb_calls() -> Iterator[Counter[str]]:
    """Count this process's DynamoDB calls by operation while the block runs (this thread's only)."""
    counted: Counter[str] = Counter()
    counting_thread = threading.get_ident()
    client_class: Any = botocore.client.BaseClient
    original = client_class._make_api_call

    def counting(client: Any, operation: str, params: dict[str, object]) -> object:
        if client.meta.service_model.service_name == "dynamodb" and threading.get_ident() == counting_thread:
            counted[operation] += 1
        return original(client, operation, params)

    client_class._make_api_call = counting
    try:
        yield counted
    finally:
        client_class._make_api_call = original


class _Pusher:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        self.sent.append(message)
        return True


def _split(counted: Counter[str]) -> tuple[int, int]:
    return sum(counted[op] for op in READS), sum(counted[op] for op in WRITES)


def per_delivery(subscribers: int) -> tuple[float, float, int, int]:
    """(reads, writes) per chunk over ``CHUNKS`` single-chunk deliveries, and (reads, writes) of the end.
    The chunks are written by another thread (the worker's writes are not the fanout's)."""
    tenant = Tenant(f"bench-fanout-{uuid.uuid4().hex[:8]}")
    config = bootstrap.settings()
    jobs, chunks = bootstrap._job_tables(tenant, config)
    service = bootstrap.job_service(tenant)
    service._queue = _NoQueue()  # the chunks are written here, not by the stack's worker
    request = JobRequest.model_validate({"message": "fanout", "model": "sim-fast", "max_tokens": 10})
    job = service.create(str(uuid.uuid4()), request).job
    store = DynamoSubscriptionStore(
        ScopedTable(aws.dynamodb(config), config.connections_table, TenantScope(tenant))
    )
    pusher = _Pusher()
    for n in range(subscribers):
        Fanout(jobs, chunks, store, pusher).subscribe(job.job_id, f"conn-{n}", 0)
    with dynamodb_calls() as counted:
        for seq in range(1, CHUNKS + 1):
            chunk = Chunk(sequence_id=seq, text=f"<{seq}>", created_at="t", tokens=10, tokens_total=10 * seq)
            writer = threading.Thread(target=chunks.append, args=(job.job_id, chunk))
            writer.start()
            writer.join()
            fanout = Fanout(jobs, chunks, store, pusher)  # each batch is an invocation of its own
            fanout.deliver(job.job_id, chunks=[chunk])
    reads, writes = _split(counted)
    ended = service.cancel(job.job_id)
    with dynamodb_calls() as at_end:
        Fanout(jobs, chunks, store, pusher).deliver(job.job_id, ended=EndMark.of(ended))
    end_reads, end_writes = _split(at_end)
    if subscribers:
        ids = [m["sequence_id"] for m in pusher.sent if m["type"] == "chunk"]
        assert ids == list(range(1, CHUNKS + 1)) and pusher.sent[-1]["type"] == "done"
    return reads / CHUNKS, writes / CHUNKS, end_reads, end_writes


def counts(counts_dir: Path, function: str) -> tuple[int, int]:
    return (
        function_calls(counts_dir, function, operations=READS),
        function_calls(counts_dir, function, operations=WRITES),
    )


def settled(counts_dir: Path, function: str, quiet: float = 1.5, timeout: float = 60) -> tuple[int, int]:
    """The function's counts once they stopped moving (the stream's last records handled)."""
    last, since = counts(counts_dir, function), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = counts(counts_dir, function)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def one_job(stack: EmbeddedStack, counts_dir: Path, subscribers: int) -> dict[str, Any]:
    wait_queue_drained(stack)
    fanout_before = settled(counts_dir, "FanoutFunction")
    subscribe_before = counts(counts_dir, "WebSocketFunction")
    job = call(
        stack,
        "POST",
        "/v1/jobs",
        {"message": f"fanout {subscribers}", "model": "sim-realtime", "max_tokens": TOKENS},
        key=str(uuid.uuid4()),
    )
    received: list[dict[str, Any]] = []
    if subscribers:
        url = f"{job['links']['subscribe']}?api_key={stack.api_key}"
        with connect(url) as socket:
            socket.send(json.dumps({"action": "subscribe", "job_id": job["job_id"], "after": 0}))
            while not received or received[-1]["type"] != "done":
                received.append(json.loads(socket.recv(timeout=120)))
    done = wait_done(stack, job["job_id"])
    fanout_after = settled(counts_dir, "FanoutFunction")
    subscribe_after = counts(counts_dir, "WebSocketFunction")
    chunks = done["progress"]["chunks_written"]
    if subscribers:
        ids = [m["sequence_id"] for m in received if m["type"] == "chunk"]
        assert ids == list(range(1, chunks + 1)), "the subscriber missed or repeated a chunk"
        assert received[-1]["status"] == "completed"
    reads, writes = fanout_after[0] - fanout_before[0], fanout_after[1] - fanout_before[1]
    subscribe = subscribe_after[0] - subscribe_before[0], subscribe_after[1] - subscribe_before[1]
    return {
        "chunks": chunks,
        "reads": reads / chunks,
        "writes": writes / chunks,
        "all_reads": (reads + subscribe[0]) / chunks,
        "all_writes": (writes + subscribe[1]) / chunks,
    }


def run(stack: EmbeddedStack, counts_dir: Path) -> None:
    print("== fanout ==")
    for subscribers in (0, 1):
        with stack.streams_paused():  # the stack's own fanout stays out of these subscriptions
            reads, writes, end_reads, end_writes = per_delivery(subscribers)
        (reads_before, writes_before), (reads_target, writes_target) = (
            BEFORE_PER_CHUNK[subscribers],
            TARGET[subscribers],
        )
        who = "no subscriber" if not subscribers else "1 subscriber"
        end = f"{end_reads} reads, {end_writes} writes"
        if subscribers:
            end = f"{BEFORE_END[0]} reads, {BEFORE_END[1]} writes -> {end}"
        print(
            f"fanout DynamoDB requests per chunk, one chunk per stream batch, {who} ({CHUNKS} chunks): "
            f"reads {reads_before:.1f} -> {reads:.2f}, writes {writes_before:.1f} -> {writes:.2f} "
            f"(target <= {reads_target:.0f} read, <= {writes_target:.0f} writes); the job's end: {end}"
        )
    for subscribers in (0, 1):
        measured = one_job(stack, counts_dir, subscribers)
        who = "no subscriber" if not subscribers else "1 WebSocket subscriber"
        line = (
            f"through the local stack (its poller batches as timing allows), {who} "
            f"({measured['chunks']} chunks, {TOKENS} tokens at sim-realtime): fanout reads "
            f"{measured['reads']:.2f}, writes {measured['writes']:.2f} per chunk"
        )
        if subscribers:
            line += (
                f"; with the WebSocket function's (connect, subscribe, backlog): reads "
                f"{measured['all_reads']:.2f}, writes {measured['all_writes']:.2f}"
            )
        print(line)
    print()
