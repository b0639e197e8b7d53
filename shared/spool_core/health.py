"""Health: probe each dependency concurrently, time it, and fold the results into one status.

``ok`` when everything answers; ``degraded`` when a non-critical dependency (a model provider) fails;
``down`` when a critical one (the database, the bucket, the queue) does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from spool_core.clock import rfc3339, utc_now

Status = Literal["ok", "degraded", "down"]


@dataclass(frozen=True)
class Probe:
    """One dependency check. ``check`` returns facts worth reporting, or raises when it is unhealthy."""

    name: str
    check: Callable[[], Mapping[str, Any]]
    critical: bool = True


@dataclass(frozen=True)
class CheckResult:
    status: Literal["ok", "down"]
    latency_ms: float
    facts: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "latency_ms": self.latency_ms, **self.facts}
        if self.error:
            body["error"] = self.error
        return body


@dataclass(frozen=True)
class HealthReport:
    status: Status
    checks: Mapping[str, CheckResult]
    checked_at: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked_at": self.checked_at,
            "checks": {name: result.as_dict() for name, result in self.checks.items()},
        }


class Unhealthy(Exception):
    """Raised by a probe that answered but found its dependency failing; ``facts`` are still reported."""

    def __init__(self, reason: str, facts: Mapping[str, Any]) -> None:
        super().__init__(reason)
        self.facts = facts


def _run(probe: Probe) -> CheckResult:
    started = time.perf_counter()
    try:
        facts = probe.check()
    except Unhealthy as exc:
        elapsed = round((time.perf_counter() - started) * 1000, 1)
        return CheckResult("down", elapsed, exc.facts, error=str(exc))
    except Exception as exc:  # a probe's failure is its result, whatever it was
        elapsed = round((time.perf_counter() - started) * 1000, 1)
        return CheckResult("down", elapsed, error=f"{type(exc).__name__}: {exc}")
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    return CheckResult("ok", elapsed, facts)


class HealthService:
    def __init__(self, probes: Sequence[Probe], timeout_seconds: float = 3.0) -> None:
        self._probes = list(probes)
        self._timeout = timeout_seconds

    def report(self) -> HealthReport:
        pool = ThreadPoolExecutor(max_workers=max(1, len(self._probes)), thread_name_prefix="probe")
        futures = {probe.name: pool.submit(_run, probe) for probe in self._probes}
        wait(futures.values(), timeout=self._timeout)
        pool.shutdown(wait=False)  # a hung probe must not hold the report; its client timeouts end it
        checks: dict[str, CheckResult] = {}
        for name, future in futures.items():
            if future.done():
                checks[name] = future.result()
            else:
                checks[name] = CheckResult(
                    "down", self._timeout * 1000, error=f"no answer within {self._timeout:g}s"
                )
        return HealthReport(self._status(checks), checks, rfc3339(utc_now()))

    def _status(self, checks: Mapping[str, CheckResult]) -> Status:
        failing = [p for p in self._probes if checks[p.name].status == "down"]
        if any(p.critical for p in failing):
            return "down"
        return "degraded" if failing else "ok"
