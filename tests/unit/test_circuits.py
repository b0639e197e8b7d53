"""The circuit breaker's memory: a worker's breaker trusts what it last read or wrote for
``fresh_seconds``, so back-to-back jobs skip a read before their first token, and its writes stay
conditional on the version, so two workers never lose each other's counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from spool_core.circuits import Circuit, CircuitBreaker
from tests.fakes import MemoryCircuitStore


class CountedStore(MemoryCircuitStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_many(self, model_ids: Iterable[str]) -> dict[str, Circuit]:
        self.reads += 1
        return super().get_many(model_ids)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_fresh_breaker_asks_without_a_read_after_its_own_write_until_the_memory_ages() -> None:
    store, clock = CountedStore(), Clock()
    breaker = CircuitBreaker(store, clock=clock, fresh_seconds=1.0)
    breaker.record_success("m", 100.0)  # the first: one read, one write
    assert store.reads == 1
    clock.now += 0.5
    assert breaker.allow("m") and store.reads == 1  # what it wrote half a second ago
    breaker.record_success("m", 100.0)  # written on the version it knows: no read
    assert store.reads == 1 and store.items["m"].calls == 2
    clock.now += 1.0
    assert breaker.allow("m") and store.reads == 2  # a second on: read again


def test_without_freshness_every_question_is_a_read() -> None:
    store = CountedStore()
    breaker = CircuitBreaker(store, clock=Clock())
    breaker.record_success("m", 100.0)
    breaker.allow("m")
    breaker.allow("m")
    assert store.reads == 3


def test_two_workers_with_memories_lose_no_count_and_see_an_open_circuit_once_their_memory_ages() -> None:
    store, clock = CountedStore(), Clock()
    one = CircuitBreaker(store, clock=clock, threshold=3, fresh_seconds=1.0)
    two = CircuitBreaker(store, clock=clock, threshold=3, fresh_seconds=1.0)
    one.record_success("m", 100.0)
    two.record_success("m", 100.0)
    one.record_success("m", 100.0)  # its known version is stale: the write is refused, re-read, applied
    assert store.items["m"].calls == 3
    for _ in range(3):
        two.record_failure("m")
    assert store.items["m"].state == "open"
    assert one.allow("m")  # within its second, the worker that did not see it open still calls once
    clock.now += 1.0
    assert not one.allow("m")  # then it reads the open circuit and skips the model
    assert store.items["m"].calls == 6 and store.items["m"].errors == 3


def test_a_worker_remembering_a_cooled_open_circuit_does_not_undo_a_failed_probe_of_another() -> None:
    """W remembers the circuit open and cooling down; V then probes after the cool-down and the probe
    fails (open again, a new cool-down). W's memory says the cool-down is over: its conditional write
    fails on the version, it re-reads, and the re-opened circuit keeps it out."""
    store, clock = CountedStore(), Clock()
    w = CircuitBreaker(store, clock=clock, threshold=3, cooldown_seconds=30.0, fresh_seconds=1.0)
    v = CircuitBreaker(store, clock=clock, threshold=3, cooldown_seconds=30.0, fresh_seconds=1.0)
    for _ in range(3):
        v.record_failure("m")
    clock.now += 29.5
    assert not w.allow("m")  # W reads it: open, cooling down
    clock.now += 0.6
    assert v.allow("m") and store.items["m"].state == "half_open"  # V's probe...
    v.record_failure("m")  # ...fails: open again
    reopened = dataclasses.replace(store.items["m"])
    clock.now += 0.2  # within W's memory, and 0.2 s into the new cool-down
    assert not w.allow("m")
    assert store.items["m"] == reopened  # nothing written over it
    clock.now += 30.0
    assert w.allow("m") and store.items["m"].state == "half_open"  # its own cool-down over: a probe


def test_a_cooled_circuit_lets_one_probe_through_at_a_time() -> None:
    """The jobs that waited for the cool-down all came at once: the half-open circuit let each through,
    and into a provider still down each spent its retries. One call probes; the others are skipped
    until its first token closes the circuit, its failure re-opens it, or its time is over."""
    store, clock = CountedStore(), Clock()
    one, two = (CircuitBreaker(store, clock=clock, threshold=1, cooldown_seconds=30.0) for _ in range(2))
    one.record_failure("m")
    clock.now += 30.0
    assert one.allow("m") and store.items["m"].state == "half_open"  # the probe
    probe_until = store.items["m"].probe_until_ms
    assert probe_until == int(clock.now * 1000) + 10_000
    assert not two.allow("m") and not one.allow("m")  # anyone else meanwhile, this worker included
    assert two.probe_at_ms("m") == probe_until  # when a job skipped for it may come back
    one.probed("m")  # its first token
    assert store.items["m"].state == "closed" and two.allow("m") and two.probe_at_ms("m") is None
    assert store.items["m"].calls == 1  # a first token is no call: the call counts when it ends


def test_a_failed_probe_reopens_and_a_probe_that_never_answers_is_taken_over() -> None:
    store, clock = CountedStore(), Clock()
    one, two = (CircuitBreaker(store, clock=clock, threshold=1, cooldown_seconds=30.0) for _ in range(2))
    one.record_failure("m")
    clock.now += 30.0
    assert one.allow("m")
    one.record_failure("m")  # the provider is still down
    assert store.items["m"].state == "open" and not two.allow("m")
    clock.now += 30.0
    assert two.allow("m")  # the next probe, after a cool-down of its own
    clock.now += 9.9
    assert not one.allow("m")
    clock.now += 0.1  # the probe's time is over (its worker died, or waits long for a first token)
    assert one.allow("m") and not two.allow("m")  # another takes it
    one.record_success("m", 50.0)
    assert store.items["m"].state == "closed" and store.items["m"].probe_until_ms == 0


def test_a_probe_that_fails_after_its_first_token_opens_the_circuit_again() -> None:
    """Its first token closed the circuit; its failure mid-answer then counted 1 of 5, and every job
    that waited went into a provider that breaks mid-answer."""
    store, clock = CountedStore(), Clock()
    one, two = (CircuitBreaker(store, clock=clock, threshold=5, cooldown_seconds=30.0) for _ in range(2))
    for _ in range(5):
        one.record_failure("m")
    clock.now += 30.0
    assert one.allow("m")
    one.probed("m")
    assert store.items["m"].state == "closed" and two.allow("m")
    one.record_failure("m")  # the probe's call breaks mid-answer
    assert store.items["m"].state == "open" and not two.allow("m")
    two.record_failure("m")  # another call's failure counts as before: no probe of its own
    clock.now += 30.0
    assert one.allow("m")
    one.probed("m")
    one.record_success("m", 40.0)
    two.record_failure("m")
    assert store.items["m"].state == "closed"  # the probe answered whole: one failure counts as one


def test_a_worker_remembering_a_probe_under_way_reads_again_before_skipping() -> None:
    """A worker's breaker trusts what it read for a second: remembering a probe under way, it skipped a
    model another worker's probe had closed meanwhile, and the job waited for the probe's end."""
    store, clock = CountedStore(), Clock()
    worker = CircuitBreaker(store, clock=clock, threshold=1, cooldown_seconds=30.0, fresh_seconds=1.0)
    other = CircuitBreaker(store, clock=clock, threshold=1, cooldown_seconds=30.0)
    other.record_failure("m")
    clock.now += 30.0
    assert other.allow("m") and not worker.allow("m")  # the worker remembers the probe under way
    other.probed("m")
    clock.now += 0.1
    assert worker.allow("m") and worker.probe_at_ms("m") is None


def test_health_shows_when_calls_come_back_while_a_probe_is_under_way() -> None:
    store, clock = CountedStore(), Clock()
    breaker = CircuitBreaker(store, clock=clock, threshold=1, cooldown_seconds=30.0)
    breaker.record_failure("m")
    clock.now += 30.0
    shown = breaker.circuits(["m"])["m"].public(breaker.cooldown)
    assert (shown["circuit"], shown["retry_at"]) == ("half_open", None)  # the next call probes it
    assert breaker.allow("m")
    shown = breaker.circuits(["m"])["m"].public(breaker.cooldown)
    assert shown["circuit"] == "half_open" and shown["retry_at"] is not None  # calls skipped until then
    clock.now += 10.0
    assert breaker.circuits(["m"])["m"].public(breaker.cooldown)["retry_at"] is None  # its time is over
