"""Circuit breakers per model, with their state in DynamoDB so every worker and the health check
see the same thing.

closed: calls go through; ``threshold`` failures within ``window`` seconds open it.
open: calls are skipped (the fallback chain moves on) until ``cooldown`` seconds have passed.
half_open: after the cool-down, calls are tried again; a success closes it, a failure reopens it.
The same item keeps the model's recent call count, error count and first-token latency.

A breaker may trust what it last read or wrote for ``fresh_seconds`` (the worker's does, for a second):
a busy worker then asks whether a model is allowed without a read before each job's first token, and
records each job's result with one conditional write (the version it knows; a re-read only when another
worker wrote since). What it risks is a circuit another worker opened within that second: one more call
to a failing provider, which the breaker counts as it would any other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from spool_core.clock import from_epoch, rfc3339

State = Literal["closed", "open", "half_open"]


@dataclass
class Circuit:
    """One model's circuit and recent health (times in epoch milliseconds, integers)."""

    model_id: str
    state: State = "closed"
    failures: int = 0
    calls: int = 0
    errors: int = 0
    latency_ms: int | None = None
    window_started_ms: int = 0
    opened_at_ms: int = 0
    version: int = 0

    def public(self, cooldown_seconds: float) -> dict[str, Any]:
        retry_at = self.opened_at_ms + int(cooldown_seconds * 1000)
        return {
            "circuit": self.state,
            "recent_calls": self.calls,
            "recent_errors": self.errors,
            "error_rate": round(self.errors / self.calls, 3) if self.calls else 0.0,
            "latency_ms": self.latency_ms,
            "retry_at": rfc3339(from_epoch(retry_at / 1000)) if self.state == "open" else None,
        }


class CircuitStore(Protocol):
    def get_many(self, model_ids: Iterable[str]) -> dict[str, Circuit]: ...

    def save(self, circuit: Circuit, expected_version: int) -> bool:
        """Write if the stored version is still ``expected_version`` (0: not stored yet)."""


class CircuitBreaker:
    def __init__(
        self,
        store: CircuitStore,
        *,
        threshold: int = 5,
        window_seconds: float = 60.0,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        fresh_seconds: float = 0.0,
    ) -> None:
        self._store = store
        self.threshold = threshold
        self.window = window_seconds
        self.cooldown = cooldown_seconds
        self._clock = clock
        self.fresh_seconds = fresh_seconds
        self._known: dict[str, tuple[Circuit, float]] = {}  # what this breaker last read or wrote, and when

    def circuit(self, model_id: str) -> Circuit:
        """The stored circuit (a read)."""
        circuit = self._store.get_many([model_id]).get(model_id) or Circuit(model_id)
        self._remember(circuit)
        return circuit

    def _remember(self, circuit: Circuit) -> None:
        """Keep a copy (the caller may change its own) of what was just read or written."""
        if self.fresh_seconds > 0:
            self._known[circuit.model_id] = (dataclasses.replace(circuit), self._clock())

    def _recent(self, model_id: str) -> Circuit:
        """What this breaker last read or wrote, if within ``fresh_seconds``; else the stored circuit."""
        known = self._known.get(model_id)
        if known is not None and self._clock() - known[1] < self.fresh_seconds:
            return dataclasses.replace(known[0])
        return self.circuit(model_id)

    def circuits(self, model_ids: Iterable[str]) -> dict[str, Circuit]:
        """Each model's circuit as a call now would find it, for health and the model list: the stored
        item changes only when a worker calls the model, so read as stored, a circuit whose cool-down
        had passed still said open (with a ``retry_at`` in the past) until a job happened to probe it."""
        ids = list(model_ids)
        found = self._store.get_many(ids)
        return {model_id: self._as_now(found.get(model_id) or Circuit(model_id)) for model_id in ids}

    def _as_now(self, circuit: Circuit) -> Circuit:
        """A copy of ``circuit`` as the next call would see it: cooled, an open circuit is half-open (that
        call probes the model); past its window, its counts are of no recent call (that call starts a new
        window). Nothing is written: the call that comes makes the same changes."""
        seen = dataclasses.replace(circuit)
        if seen.state == "open" and self._cooled(seen):
            seen.state = "half_open"
        if seen.window_started_ms and self._now_ms() - seen.window_started_ms > self.window * 1000:
            seen.calls, seen.errors, seen.failures = 0, 0, 0
        return seen

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def allow(self, model_id: str) -> bool:
        circuit = self._recent(model_id)
        if circuit.state != "open":
            return True
        if not self._cooled(circuit):
            return False
        # Cooled down: try the model again (half-open). The write is conditional: when another worker
        # wrote meanwhile, its circuit decides, and one its failed probe re-opened is not cooled.
        return self._change(model_id, self._half_open).state != "open"

    def probe_at_ms(self, model_id: str) -> int | None:
        """When the model's open circuit may be probed (epoch ms), from what this breaker last read or
        wrote; None when it is not open (another worker half-opened or closed it since)."""
        circuit = self._recent(model_id)
        return self._cools_at_ms(circuit) if circuit.state == "open" else None

    def _cools_at_ms(self, circuit: Circuit) -> int:
        return circuit.opened_at_ms + int(self.cooldown * 1000)

    def _cooled(self, circuit: Circuit) -> bool:
        return self._now_ms() >= self._cools_at_ms(circuit)

    def _half_open(self, circuit: Circuit) -> bool:
        if circuit.state != "open" or not self._cooled(circuit):
            return False  # half-open or closed already; or re-opened since: nothing to write
        circuit.state = "half_open"
        return True

    def record_success(self, model_id: str, latency_ms: float | None) -> None:
        def success(circuit: Circuit) -> bool:
            self._roll_window(circuit)
            circuit.calls += 1
            circuit.state, circuit.failures = "closed", 0
            if latency_ms is not None:
                previous = circuit.latency_ms
                circuit.latency_ms = round(
                    latency_ms if previous is None else 0.7 * previous + 0.3 * latency_ms
                )
            return True

        self._change(model_id, success)

    def record_failure(self, model_id: str) -> None:
        def failure(circuit: Circuit) -> bool:
            self._roll_window(circuit)
            circuit.calls += 1
            circuit.errors += 1
            circuit.failures += 1
            if circuit.state == "half_open" or circuit.failures >= self.threshold:
                circuit.state, circuit.opened_at_ms = "open", self._now_ms()
            return True

        self._change(model_id, failure)

    def _roll_window(self, circuit: Circuit) -> None:
        now = self._now_ms()
        if now - circuit.window_started_ms > self.window * 1000:
            circuit.window_started_ms, circuit.calls, circuit.errors, circuit.failures = now, 0, 0, 0

    def _change(self, model_id: str, change: Callable[[Circuit], bool]) -> Circuit:
        """Apply ``change`` (False: nothing to write) and write it if the stored version is still the
        one it was applied to; else re-read and apply again. The circuit as written (or as found)."""
        circuit = self._recent(model_id)
        for _ in range(6):  # optimistic: the first try may be on a remembered circuit, then five reads
            version = circuit.version
            if not change(circuit):
                return circuit
            circuit.version = version + 1
            if self._store.save(circuit, version):
                self._remember(circuit)
                return circuit
            circuit = self.circuit(model_id)
        return circuit


def circuit_item(circuit: Circuit) -> dict[str, Any]:
    return asdict(circuit)
