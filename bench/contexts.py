"""Context store: a 5 MB / 500-file upload, a one-file PATCH, tiktoken throughput."""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

from spool.devstack.runtime import TRACEMALLOC_ENV
from spool.devstack.stack import EmbeddedStack
from spool_core import bootstrap, tokens
from spool_core.contexts.model import PatchContextRequest
from spool_core.observability import logger
from spool_core.tenancy import Tenant

FILES = 500
FILE_BYTES = 10_000  # 500 x 10 kB = 5 MB
WORDS = [
    *("def", "return", "class", "import", "self", "value", "result", "context", "token", "stream", "chunk"),
    *("job", "model", "request", "response", "error", "retry", "cursor", "sequence", "tenant", "bucket"),
    *("limit", "budget", "cost", "usage", "window", "encode", "decode", "for", "while", "if", "else", "try"),
    *("except", "finally", "with", "yield", "async", "await", "lambda", "None", "True", "False"),
]


def corpus(seed: int = 7) -> list[dict[str, str]]:
    """500 distinct code-like files of 10 kB each (deterministic)."""
    rng = random.Random(seed)
    files = []
    for i in range(FILES):
        lines, size = [], 0
        while size < FILE_BYTES:
            indent = "    " * rng.randint(0, 3)
            line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f"  # {i}"
            lines.append(line)
            size += len(line) + 1
        files.append({"path": f"src/pkg{i // 50}/module_{i}.py", "content": "\n".join(lines)[:FILE_BYTES]})
    return files


def request(stack: EmbeddedStack, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
    req = urllib.request.Request(stack.base_url + path, data=body, method=method)  # noqa: S310 - loopback
    req.add_header("Authorization", f"Bearer {stack.api_key}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=120) as response:  # noqa: S310
        return response.status, json.loads(response.read() or b"null")


def handler_memory(stack: EmbeddedStack, payload: bytes) -> int:
    """Peak allocation of the contexts handler for one upload, measured (tracemalloc, in its
    container) around the invocation only."""
    from tests.support import api_event

    function = stack.function_variant("ContextsFunction", {TRACEMALLOC_ENV: "1"})
    tenant = stack.dev_keys[stack.api_key]
    event = api_event("POST", "/v1/contexts", body=payload.decode(), tenant=tenant)
    function.invoke(event)  # warm: imports and clients outside the measurement
    event = api_event("POST", "/v1/contexts", body=payload.decode() + " ", tenant=tenant)
    response = function.invoke(event)
    peak = function.reports[-1].peak_allocation_bytes
    function.shutdown()
    assert response["statusCode"] == 201, response["body"]
    assert peak is not None
    return peak


def most_files(stack: EmbeddedStack) -> None:
    """A context of the most files one may hold (small distinct files: one blob each), against the
    integration timeout it must finish within."""
    assert stack.description is not None
    limit = int(
        stack.description.environment_for(stack.template, "ContextsFunction")["SPOOL_MAX_CONTEXT_FILES"]
    )
    files = [
        {"path": f"src/d{i // 100}/f{i}.py", "content": f"def f{i}():\n    return {i}\n"}
        for i in range(limit)
    ]
    started = time.perf_counter()
    try:
        status, _ = request(stack, "POST", "/v1/contexts", json.dumps({"files": files}).encode())
    except urllib.error.HTTPError as error:
        status = error.code
    elapsed = time.perf_counter() - started
    print(
        f"upload of the most files a context holds ({limit:,} small files): {elapsed:.1f} s,"
        f" answered {status} (target: well inside the 29 s integration timeout, <= 15 s)"
    )


def run(stack: EmbeddedStack) -> None:
    files = corpus()
    payload = json.dumps({"files": files, "ttl_seconds": 3600}).encode()
    print("== contexts ==")
    logger.setLevel("ERROR")  # in-process invocations below would log every request
    most_files(stack)
    print(f"payload: {len(files)} files, {len(payload) / 1e6:.2f} MB of JSON")

    # Upload through the embedded stack (gateway, authorizer, the contexts function's container).
    timings, rss = [], []
    context_id = ""
    for _ in range(3):
        started = time.perf_counter()
        status, created = request(stack, "POST", "/v1/contexts", payload)
        timings.append(time.perf_counter() - started)
        rss.append(stack.functions["ContextsFunction"].reports[-1].max_memory_used_mb)
        assert status == 201, created
        context_id = created["context_id"]
    upload_s = statistics.median(timings)
    print(
        f"upload 5 MB / 500 files: median {upload_s * 1000:.0f} ms over 3 runs "
        f"(first, with tokenization: {timings[0] * 1000:.0f} ms)"
    )
    print(
        f"contexts function's Max Memory Used (its REPORT line): {max(rss)} MB"
        f" of {stack.functions['ContextsFunction'].spec.memory_mb} MB"
    )

    handler_peak = handler_memory(stack, payload)
    print(
        f"peak memory of the handler alone: {handler_peak / 1e6:.1f} MB"
        f" = {handler_peak / len(payload):.1f}x the payload (beyond the event it was given)"
    )

    # PATCH one file: bytes on the wire and tokenization avoided.
    changed = {"path": files[42]["path"], "content": files[42]["content"].replace("def", "async def", 1)}
    patch_body = json.dumps({"upsert": [changed]}).encode()
    status, patched = request(stack, "PATCH", f"/v1/contexts/{context_id}", patch_body)
    assert status == 200, patched
    print(
        f"PATCH one file: {len(patch_body):,} bytes sent vs {len(payload):,} for a full upload "
        f"= {100 * len(patch_body) / len(payload):.2f}% (target <= 2%)"
    )
    service = bootstrap.context_service(Tenant(stack.dev_keys[stack.api_key]))
    changed["content"] += "\n# again"
    service.patch(context_id, PatchContextRequest.model_validate({"upsert": [changed]}))
    stats = service.last_stats
    full = sum(len(f["content"].encode()) for f in files)
    print(
        f"  tokenized on PATCH: {stats.files_tokenized} file(s), {stats.bytes_tokenized:,} bytes "
        f"of {full:,} ({100 * (1 - stats.bytes_tokenized / full):.2f}% of tokenization avoided); "
        f"blobs written {stats.blobs_written}, reused {stats.blobs_reused}"
    )

    # tiktoken throughput, and its share of a fresh upload.
    text = "\n".join(f["content"] for f in files)
    started = time.perf_counter()
    for _ in range(3):
        tokens.count(text)
    per_pass = (time.perf_counter() - started) / 3
    print(
        f"tiktoken cl100k_base: {len(text) / 1e6 / per_pass:.1f} MB/s single-threaded; "
        f"tokenizing 5 MB = {per_pass * 1000:.0f} ms = {100 * per_pass / timings[0]:.0f}% of the first upload"
    )
    print()
