"""Circuit breakers per model, with their state in DynamoDB so every worker and the health check
see the same thing.

closed: calls go through; ``threshold`` failures within ``window`` seconds open it.
open: calls are skipped (the fallback chain moves on) until ``cooldown`` seconds have passed.
half_open: after the cool-down, one call probes the model (taken with a conditional write, for
``probe_seconds``; then another may): its first token or success closes the circuit, a failure reopens
it, even after its first token (a provider that breaks mid-answer). Other calls are skipped meanwhile,
as while open: the jobs that waited for the cool-down all came at once, and into a provider still
down each spent its retries and failed.
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
    probe_until_ms: int = 0  # half-open: the probing call's time; others are skipped until then
    version: int = 0

    def public(self, cooldown_seconds: float) -> dict[str, Any]:
        """As health and the model list show it: ``retry_at`` is when calls may come back, the end of
        the cool-down, or of a probe under way (none: the next call probes it, or it is closed)."""
        retry_at = self.opened_at_ms + int(cooldown_seconds * 1000) if self.state == "open" else None
        if self.state == "half_open" and self.probe_until_ms:
            retry_at = self.probe_until_ms
        return {
            "circuit": self.state,
            "recent_calls": self.calls,
            "recent_errors": self.errors,
            "error_rate": round(self.errors / self.calls, 3) if self.calls else 0.0,
            "latency_ms": self.latency_ms,
            "retry_at": rfc3339(from_epoch(retry_at / 1000)) if retry_at is not None else None,
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
        probe_seconds: float = 10.0,
    ) -> None:
        self._store = store
        self.threshold = threshold
        self.window = window_seconds
        self.cooldown = cooldown_seconds
        self.probe_seconds = probe_seconds
        self._clock = clock
        self.fresh_seconds = fresh_seconds
        self._known: dict[str, tuple[Circuit, float]] = {}  # what this breaker last read or wrote, and when
        self._probing: set[str] = set()  # the models whose probe this breaker's callers took
        self._probation: set[str] = set()  # ... and whose probe closed the circuit at its first token

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
            seen.state, seen.probe_until_ms = "half_open", 0
        if seen.state == "half_open" and self._now_ms() >= seen.probe_until_ms:
            seen.probe_until_ms = 0  # no probe under way: the next call probes it
        if seen.window_started_ms and self._now_ms() - seen.window_started_ms > self.window * 1000:
            seen.calls, seen.errors, seen.failures = 0, 0, 0
        return seen

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _as_asked(self, model_id: str) -> Circuit:
        circuit = self._recent(model_id)
        if circuit.state == "half_open" and not self._probe_due(circuit) and self.fresh_seconds > 0:
            # Remembered with a probe under way, which may have closed it since: a skip reads it again
            # (a job skipped on memory was delayed to the end of a probe that had answered).
            circuit = self.circuit(model_id)
        return circuit

    def may_call(self, model_id: str) -> bool:
        """Whether ``allow`` may let a call through now (closed, or a probe due), read without taking
        the probe: a caller that must prepare the call first (and may find it cannot make it) asks
        this, then ``allow``, which decides."""
        circuit = self._as_asked(model_id)
        return circuit.state == "closed" or self._probe_due(circuit)

    def allow(self, model_id: str) -> bool:
        circuit = self._as_asked(model_id)
        if circuit.state == "closed" or not self._probe_due(circuit):
            return circuit.state == "closed"
        # Cooled down, or the last probe's time is over: this call probes the model. The write is
        # conditional: when another caller wrote meanwhile, its circuit decides (its probe is taken,
        # or closed, or its failed probe re-opened it).
        circuit, taken = self._change(model_id, self._take_probe)
        if taken:
            self._probing.add(model_id)
        return taken or circuit.state == "closed"

    def probed(self, model_id: str) -> None:
        """The model sent a first token: a probe this breaker's caller took closes the circuit (no call
        is counted: the call's success or failure is, when it ends, and its failure opens the circuit
        again as a failed probe does)."""
        if model_id in self._probing:
            self._probing.discard(model_id)
            self._probation.add(model_id)

            def close(circuit: Circuit) -> bool:
                if circuit.state != "half_open":
                    return False  # closed already, or re-opened since
                circuit.state, circuit.failures, circuit.probe_until_ms = "closed", 0, 0
                return True

            self._change(model_id, close)

    def probe_under_way(self, model_id: str) -> bool:
        """Whether the model is skipped for another caller's probe (from what this breaker knows)."""
        circuit = self._recent(model_id)
        return circuit.state == "half_open" and not self._probe_due(circuit)

    def probe_at_ms(self, model_id: str) -> int | None:
        """When the model's circuit may be probed (epoch ms), from what this breaker last read or wrote:
        the end of its cool-down, or of the probe under way; None when it is closed."""
        circuit = self._recent(model_id)
        if circuit.state == "closed":
            return None
        return self._cools_at_ms(circuit) if circuit.state == "open" else circuit.probe_until_ms

    def _cools_at_ms(self, circuit: Circuit) -> int:
        return circuit.opened_at_ms + int(self.cooldown * 1000)

    def _cooled(self, circuit: Circuit) -> bool:
        return self._now_ms() >= self._cools_at_ms(circuit)

    def _probe_due(self, circuit: Circuit) -> bool:
        """Whether a call may probe the circuit now: open and cooled, or half-open with no probe under way."""
        if circuit.state == "open":
            return self._cooled(circuit)
        return circuit.state == "half_open" and self._now_ms() >= circuit.probe_until_ms

    def _take_probe(self, circuit: Circuit) -> bool:
        if not self._probe_due(circuit):
            return False  # another caller took the probe, or closed or re-opened the circuit
        circuit.state, circuit.probe_until_ms = "half_open", self._now_ms() + int(self.probe_seconds * 1000)
        return True

    def record_success(self, model_id: str, latency_ms: float | None) -> None:
        self._probing.discard(model_id)
        self._probation.discard(model_id)

        def success(circuit: Circuit) -> bool:
            self._roll_window(circuit)
            circuit.calls += 1
            circuit.state, circuit.failures, circuit.probe_until_ms = "closed", 0, 0
            if latency_ms is not None:
                previous = circuit.latency_ms
                circuit.latency_ms = round(
                    latency_ms if previous is None else 0.7 * previous + 0.3 * latency_ms
                )
            return True

        self._change(model_id, success)

    def record_failure(self, model_id: str) -> None:
        self._probing.discard(model_id)
        probe = model_id in self._probation  # the probe's call, failed after its first token
        self._probation.discard(model_id)

        def failure(circuit: Circuit) -> bool:
            self._roll_window(circuit)
            circuit.calls += 1
            circuit.errors += 1
            circuit.failures += 1
            if circuit.state == "half_open" or probe or circuit.failures >= self.threshold:
                circuit.state, circuit.opened_at_ms = "open", self._now_ms()
            return True

        self._change(model_id, failure)

    def _roll_window(self, circuit: Circuit) -> None:
        now = self._now_ms()
        if now - circuit.window_started_ms > self.window * 1000:
            circuit.window_started_ms, circuit.calls, circuit.errors, circuit.failures = now, 0, 0, 0

    def _change(self, model_id: str, change: Callable[[Circuit], bool]) -> tuple[Circuit, bool]:
        """Apply ``change`` (False: nothing to write) and write it if the stored version is still the
        one it was applied to; else re-read and apply again. The circuit as written (or as found), and
        whether this call wrote it."""
        circuit = self._recent(model_id)
        for _ in range(6):  # optimistic: the first try may be on a remembered circuit, then five reads
            version = circuit.version
            if not change(circuit):
                return circuit, False
            circuit.version = version + 1
            if self._store.save(circuit, version):
                self._remember(circuit)
                return circuit, True
            circuit = self.circuit(model_id)
        return circuit, False


def circuit_item(circuit: Circuit) -> dict[str, Any]:
    return asdict(circuit)
