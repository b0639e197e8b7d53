"""Generation jobs: token delivery delay, DynamoDB writes per 1,000 tokens, worker memory."""

from __future__ import annotations

import json
import re
import statistics
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from spool.client import Client
from spool.devstack.stack import EmbeddedStack
from spool_core import bootstrap
from spool_core.clock import rfc3339, utc_now
from spool_core.jobs.cadence import Cadence
from spool_core.jobs.model import JobRequest
from spool_core.observability import logger
from spool_core.queue import JobMessage
from spool_core.tenancy import Tenant

WORD = re.compile(r"[A-Za-z]+")
WRITE_OPERATIONS = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")


def call(stack: EmbeddedStack, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(stack.base_url + path, data=data, method=method)  # noqa: S310 - loopback
    request.add_header("Authorization", f"Bearer {stack.api_key}")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Idempotency-Key", key)
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())


def epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_done(stack: EmbeddedStack, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = call(stack, "GET", f"/v1/jobs/{job_id}")
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        time.sleep(0.2)


def delivery_delay(stack: EmbeddedStack, transport: str, tokens: int = 500, rate: float = 50.0) -> None:
    """For each token: when the client holds it minus when the simulated provider emitted it, with the
    Python client reading over ``transport`` (sse, websocket or poll: long-poll).

    The simulated provider paces tokens exactly (token i at start + i/rate), and a chunk is flushed
    as its last token arrives, so token j of a chunk whose last token is k was emitted
    (k - j) / rate before the chunk's ``created_at`` (read from the log afterwards).
    """
    job = call(
        stack,
        "POST",
        "/v1/jobs",
        {"message": f"delay {transport}", "model": "sim-realtime", "max_tokens": tokens},
        key=str(uuid.uuid4()),
    )
    held: dict[int, float] = {}
    with Client(stack.base_url, stack.api_key) as client:
        chunks = {
            "sse": client.events,
            "websocket": client.subscribe,
            "poll": client.stream_chunks,
        }[transport](job["job_id"])
        for chunk in chunks:
            held[chunk["sequence_id"]] = time.time()
        log = client.chunks(job["job_id"], 0, limit=1000)["chunks"]
    delays = _token_delays(log, held, rate)
    p50, p95 = statistics.median(delays), delays[int(0.95 * (len(delays) - 1))]
    after_flush = sorted(held[c["sequence_id"]] - epoch(c["created_at"]) for c in log)
    name = {"sse": "SSE", "websocket": "WebSocket", "poll": "long-poll"}[transport]
    # A token waits in the worker's buffer for at most the cadence's longest interval (by design: the
    # chunk cadence, spool_core.jobs.cadence), then the chunk travels to the client.
    target_ms = Cadence().max_ms + 150
    print(
        f"delivery delay at sim-realtime ({len(delays)} tokens, {name} client): "
        f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (target: p95 <= the longest flush interval + 150"
        f" = {target_ms:,} ms: {'meets' if p95 * 1000 <= target_ms else 'misses'}); of which after the"
        f" chunk's write: p95 {after_flush[int(0.95 * (len(after_flush) - 1))] * 1000:.0f} ms"
    )


def _token_delays(log: list[dict[str, Any]], held: dict[int, float], rate: float) -> list[float]:
    """Per token: when the client held its chunk minus when the simulated provider emitted it."""
    delays = []
    for chunk in log:
        flushed = epoch(chunk["created_at"])
        n_tokens = len(WORD.findall(chunk["text"]))  # each simulated token carries one word
        for j in range(n_tokens):
            delays.append(held[chunk["sequence_id"]] - (flushed - (n_tokens - 1 - j) / rate))
    return sorted(delays)


def _read_native(stack: EmbeddedStack, job_id: str, held: dict[int, float]) -> None:
    with Client(stack.base_url, stack.api_key) as client:
        for chunk in client.events(job_id):
            held[chunk["sequence_id"]] = time.time()


def _read_openai(sdk: Any, response_id: str, held: dict[int, float]) -> None:
    for event in sdk.responses.retrieve(response_id, stream=True):
        if event.type == "response.output_text.delta":
            held[event.sequence_number - 3] = time.time()  # the delta of chunk k is event 3 + k


def openai_added_delay(stack: EmbeddedStack, jobs: int = 4, tokens: int = 400, rate: float = 50.0) -> None:
    """The OpenAI-compatible stream (Responses API, official SDK) and the native SSE stream read the
    same live jobs side by side; the figure is how much later the OpenAI reader holds each token."""
    import threading

    import openai

    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)
    native: list[float] = []
    compat: list[float] = []
    for _ in range(jobs):
        created = sdk.responses.create(
            model="sim-realtime", input="added delay", max_output_tokens=tokens, background=True
        )
        job_id = created.model_extra["spool"]["job_id"]  # type: ignore[index]
        held_native: dict[int, float] = {}
        held_compat: dict[int, float] = {}
        readers = [
            threading.Thread(target=_read_native, args=(stack, job_id, held_native)),
            threading.Thread(target=_read_openai, args=(sdk, created.id, held_compat)),
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        with Client(stack.base_url, stack.api_key) as client:
            log = client.chunks(job_id, 0, limit=1000)["chunks"]
        native += _token_delays(log, held_native, rate)
        compat += _token_delays(log, held_compat, rate)
    native.sort()
    compat.sort()

    def ms(values: list[float], q: float) -> float:
        return values[int(q * (len(values) - 1))] * 1000

    added = ms(compat, 0.95) - ms(native, 0.95)
    print(
        f"OpenAI-compatible stream vs native SSE ({len(native)} tokens each, the same jobs read side by "
        f"side): p50 {ms(compat, 0.5):.0f} vs {ms(native, 0.5):.0f} ms, p95 {ms(compat, 0.95):.0f} vs "
        f"{ms(native, 0.95):.0f} ms; added delay at p95 {added:+.1f} ms (target: < 10 ms)"
    )


def wait_queue_drained(stack: EmbeddedStack, timeout: float = 300) -> None:
    """Until the worker has finished every job queued so far (their writes would count otherwise)."""
    import boto3

    assert stack.description is not None
    sqs = boto3.session.Session().client(
        "sqs", endpoint_url=stack.description.endpoint_url, region_name=stack.description.region
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        attributes = sqs.get_queue_attributes(
            QueueUrl=stack.description.refs["JobsQueue"],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        if not any(int(value) for value in attributes.values()):
            return
        time.sleep(0.2)
    raise TimeoutError("the jobs queue did not drain")


def writes_per_1000_tokens(stack: EmbeddedStack, counts_dir: Path, model: str, tokens: int = 1000) -> None:
    wait_queue_drained(stack)
    before = _dynamodb_writes(counts_dir)
    job = call(
        stack,
        "POST",
        "/v1/jobs",
        {"message": f"writes {model}", "model": model, "max_tokens": tokens},
        key=str(uuid.uuid4()),
    )
    done = wait_done(stack, job["job_id"])
    time.sleep(0.5)
    writes = _dynamodb_writes(counts_dir) - before
    per_k = writes * 1000 / done["usage"]["output_tokens"]
    target = {"sim-realtime": 110, "sim-fast": 25}[model]
    print(
        f"DynamoDB writes per 1,000 output tokens at {model} (worker): {per_k:.0f} "
        f"({done['progress']['chunks_written']} chunks; target <= {target})"
    )


def _dynamodb_writes(counts_dir: Path) -> int:
    """The worker's DynamoDB writes (the chunk log, the lease, the final transaction)."""
    return function_calls(counts_dir, "WorkerFunction", operations=WRITE_OPERATIONS)


def function_calls(
    counts_dir: Path, function: str, service: str = "dynamodb", operations: tuple[str, ...] | None = None
) -> int:
    """AWS calls made so far by the containers of ``function`` (every function when empty): each
    container writes its counts to ``<function>-<pid>.json``."""
    total = 0
    for path in counts_dir.glob(f"{function}*.json"):
        counts = json.loads(path.read_text() or "{}")
        total += sum(
            n
            for name, n in counts.items()
            if name.startswith(f"{service}.") and (operations is None or name.split(".")[-1] in operations)
        )
    return total


class _NoQueue:
    """Jobs measured in this process are run right here, not by the stack's worker processes."""

    def send(self, job_id: str, tenant_id: str, *, continuation: int = 0, **message: Any) -> None:
        return None


def worker_memory(stack: EmbeddedStack, sizes: tuple[int, ...]) -> list[int]:
    """Peak allocation of one worker invocation per output size (in this process, tracemalloc),
    after a warm-up invocation so imports and clients are not counted."""
    from spool.devstack.runtime import TRACEMALLOC_ENV
    from spool.devstack.worker_loop import sqs_record

    tenant = Tenant(stack.dev_keys[stack.api_key])
    service = bootstrap.job_service(tenant)
    service._queue = _NoQueue()
    function = stack.function_variant(
        "WorkerFunction", {TRACEMALLOC_ENV: "1", "POWERTOOLS_LOG_LEVEL": "ERROR"}
    )

    def invoke(tokens: int) -> int:
        request = JobRequest.model_validate(
            {"message": f"memory {tokens}", "model": "sim-fast", "max_tokens": tokens}
        )
        job = service.create(str(uuid.uuid4()), request).job
        body = JobMessage(job_id=job.job_id, tenant_id=tenant.id).model_dump_json()
        message = {
            "MessageId": str(uuid.uuid4()),
            "ReceiptHandle": "bench",
            "Body": body,
            "MD5OfBody": "",
            "Attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": rfc3339(utc_now())},
        }
        event = {"Records": [sqs_record(message, "arn:aws:sqs:us-east-1:123456789012:bench", "us-east-1")]}
        function.invoke(event, timeout=600)
        peak = function.reports[-1].peak_allocation_bytes
        assert peak is not None
        done = service.get(job.job_id)
        assert done.status == "completed", done.status
        assert done.usage.output_tokens == tokens
        return peak

    invoke(100)
    peaks = [invoke(tokens) for tokens in sizes]
    function.shutdown()
    return peaks


def run(stack: EmbeddedStack, counts_dir: Path) -> None:
    print("== jobs ==")
    logger.setLevel("ERROR")  # in-process invocations below would log every job
    admission(stack, counts_dir)
    for transport in ("poll", "websocket", "sse"):
        delivery_delay(stack, transport)
    openai_added_delay(stack)
    writes_per_1000_tokens(stack, counts_dir, "sim-realtime")
    writes_per_1000_tokens(stack, counts_dir, "sim-fast")
    with stack.streams_paused():  # the fanout runs in this process too; keep it out of the measurement
        small, large = worker_memory(stack, (2_000, 50_000))
    print(
        f"worker peak memory (tracemalloc, one invocation): 2,000 tokens {small / 1e6:.1f} MB, "
        f"50,000 tokens {large / 1e6:.1f} MB (ratio {large / small:.2f}; 25x the output)"
    )
    print()


def admission(stack: EmbeddedStack, counts_dir: Path, requests: int = 100) -> None:
    """POST /v1/jobs end to end: latency and the DynamoDB requests each admission makes."""
    latencies, calls, auth_calls = [], [], []
    for i in range(requests):
        before = function_calls(counts_dir, "JobsFunction")
        auth_before = function_calls(counts_dir, "AuthorizerFunction")
        started = time.perf_counter()
        call(
            stack,
            "POST",
            "/v1/jobs",
            {"message": f"admission {i}", "model": "sim-fast", "max_tokens": 16},
            key=str(uuid.uuid4()),
        )
        latencies.append(time.perf_counter() - started)
        calls.append(function_calls(counts_dir, "JobsFunction") - before)
        auth_calls.append(function_calls(counts_dir, "AuthorizerFunction") - auth_before)
    latencies.sort()
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    median_calls = statistics.median(calls)
    print(
        f"admission (POST /v1/jobs, {requests} sequential): p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms;"
        f" DynamoDB requests per admission: median {median_calls:.0f} in the jobs function"
        f" (min {min(calls)}, max {max(calls)}) + {statistics.median(auth_calls):.0f} in the authorizer"
        f" (target <= 8)"
    )
