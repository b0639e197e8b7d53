"""Two tenants: one floods requests; the other's latency and errors must stay near its own baseline.

The stack runs with the deployed per-tenant request budget (the usage plan's 20 requests/s, bursts
of 40), which the local gateway enforces the way API Gateway does: the flooder's excess is answered
429 at the edge, before the authorizer or any function runs, so the quiet tenant keeps its share.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx2 as httpx

from spool.devstack.stack import EmbeddedStack

QUIET_KEY = "sk-bench-quiet"
FLOOD_KEY = "sk-bench-flood"
DEPLOYED_LIMITS = {"TenantRequestRateLimit": "20", "TenantRequestBurstLimit": "40"}
QUIET_RATE = 5.0  # requests/s: well inside its budget
QUIET_REQUESTS = 150
FLOOD_THREADS = 6
# The documented margin: under a flood the quiet tenant's p95 stays within 2x its baseline plus
# 50 ms (the flooder's 429s still cost the shared machine some CPU), and it gets no errors at all.
P95_FACTOR, P95_SLACK_MS = 2.0, 50.0


@dataclass
class Sample:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def add(self, status: int, ms: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies_ms.append(ms)

    def p95(self) -> float:
        return statistics.quantiles(self.latencies_ms, n=20)[-1]

    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 400)


def _quiet(base_url: str) -> Sample:
    """Paced requests (GET /v1/models: authorizer, one function, a registry read)."""
    sample = Sample()
    auth = {"Authorization": f"Bearer {QUIET_KEY}"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=30) as http:
        start = time.monotonic()
        for i in range(QUIET_REQUESTS):
            delay = start + i / QUIET_RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing an open-loop client, not waiting for a condition
            began = time.perf_counter()
            status = http.get("/v1/models").status_code
            sample.add(status, (time.perf_counter() - began) * 1000)
    return sample


def _flood(base_url: str, stop: threading.Event, sample: Sample, lock: threading.Lock) -> None:
    auth = {"Authorization": f"Bearer {FLOOD_KEY}"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=30) as http:
        while not stop.is_set():
            began = time.perf_counter()
            status = http.get("/v1/models").status_code
            with lock:
                sample.add(status, (time.perf_counter() - began) * 1000)


def run() -> None:
    keys = f"{QUIET_KEY}:quiet,{FLOOD_KEY}:flood"
    with EmbeddedStack(port=0, ws_port=0, parameter_overrides=DEPLOYED_LIMITS, dev_keys=keys) as stack:
        _quiet(stack.base_url)  # warm the functions
        baseline = _quiet(stack.base_url)
        stop, lock, flood = threading.Event(), threading.Lock(), Sample()
        flooders = [
            threading.Thread(target=_flood, args=(stack.base_url, stop, flood, lock), daemon=True)
            for _ in range(FLOOD_THREADS)
        ]
        for thread in flooders:
            thread.start()
        try:
            flooded = _quiet(stack.base_url)
        finally:
            stop.set()
            for thread in flooders:
                thread.join(timeout=60)
    limit = baseline.p95() * P95_FACTOR + P95_SLACK_MS
    accepted = flood.statuses.get(200, 0)
    print("two tenants, one flooding (per-tenant budget 20 requests/s, bursts of 40, as deployed):")
    print(
        f"  quiet tenant p95: {baseline.p95():.0f} ms alone, {flooded.p95():.0f} ms under the flood"
        f" (target <= {limit:.0f} ms: 2x baseline + {P95_SLACK_MS:.0f} ms)"
    )
    print(
        f"  quiet tenant errors: {baseline.errors()} alone, {flooded.errors()} under the flood"
        f" of {QUIET_REQUESTS} (target 0)"
    )
    print(
        f"  flooder: {sum(flood.statuses.values())} requests, {flood.statuses.get(429, 0)} answered 429,"
        f" {accepted} served (statuses {dict(sorted(flood.statuses.items()))})"
    )
