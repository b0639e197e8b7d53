"""The worker's logic on an atomic in-memory store. Whatever stage an attempt dies at, and whichever
write is applied with its reply lost, the job ends once: its log is contiguous and equal to the
uninterrupted text, its usage is settled exactly once and its slot is released."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from unittest.mock import patch

import pytest

from spool_core.clock import from_epoch, rfc3339
from spool_core.jobs.dead_letters import SETTLE_WINDOW_MS
from spool_core.jobs.model import JobRequest
from spool_core.jobs.ports import Signals
from spool_core.jobs.runner import Outcome, build_messages
from spool_core.limits.model import TenantLimits
from spool_core.providers import GenerationRequest
from spool_core.providers.simulated import simulated_text
from tests.ledger import Crash, JobWorld, TenantLedger, running
from tests.support import wait_for


def create(world: JobWorld, tenant: str = "acme", key: str = "k", **fields: Any) -> str:
    body = {"message": "Explain the code", "model": "sim-fast", "max_tokens": 300, **fields}
    job_id: str = world.service(tenant).create(key, JobRequest.model_validate(body)).job.job_id
    return job_id


def expected_text(world: JobWorld, job_id: str, tenant: str = "acme") -> str:
    job = world.ledger.tenant(tenant).get(job_id)
    assert job is not None
    model = world.catalog.resolve(job.request.model)
    request = GenerationRequest(
        model.provider_model_id,
        build_messages(lambda: world._contexts, job, lambda: world.request_store(tenant)),
        job.request.max_tokens,
        job.request.temperature,
    )
    return simulated_text(request)


def assert_ended_once(world: JobWorld, job_id: str, status: str = "completed", tenant: str = "acme") -> Any:
    job = world.ledger.tenant(tenant).get(job_id)
    assert job is not None and job.status == status, job
    log = list(world.ledger.tenant(tenant).all(job_id))
    assert [c.sequence_id for c in log] == list(range(1, len(log) + 1))  # no gap, no duplicate
    text = "".join(c.text for c in log)
    assert expected_text(world, job_id, tenant).startswith(text)
    if status == "completed":
        assert text == expected_text(world, job_id, tenant) == world.service(tenant).view(job)["output"]
    assert job.output is None  # never on the item: the job resource composes it from the log
    assert [s.job_id for _, s in world.ledger.settlements].count(job_id) == 1  # settled exactly once
    assert running(world.ledger, tenant) == 0
    rollups = world.ledger.tenant(tenant).rollups("0000", "9999")
    assert sum(r["jobs"] for r in rollups) == 1
    assert (
        sum(r["output_tokens"] for r in rollups)
        == job.usage.output_tokens
        == (log[-1].tokens_total if log else 0)
    )
    return job


def test_a_clean_run() -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=500)
    assert world.drain() == ["done"]
    job = assert_ended_once(world, job_id)
    log = list(world.ledger.tenant("acme").all(job_id))
    assert len(log) == 1 + -(-499 // 64)  # the first token alone, then 64-token chunks
    assert job.cost_nanos == world.catalog.resolve("sim-fast").cost_nanos(job.usage.input_tokens, 500)


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop", "stop"),
        ("max_tokens", "length"),
        ("length", "length"),
        ("guardrail_intervened", "content_filter"),
    ],
)
def test_the_providers_stop_reason_becomes_the_jobs_finish_reason(
    stop_reason: str, finish_reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spool_core.providers import Finished, simulated

    def reporting(input_tokens: int, output_tokens: int, stop_reason: str = "") -> Finished:
        return Finished(input_tokens, output_tokens, stop_reason=reported)

    reported = stop_reason  # what the provider says, whatever the simulator would
    monkeypatch.setattr(simulated, "Finished", reporting)
    world = JobWorld()
    job_id = create(world, max_tokens=50)
    assert world.drain() == ["done"]
    job = assert_ended_once(world, job_id)
    assert job.finish_reason == finish_reason
    assert Finished(1, 1, stop_reason).finish_reason == finish_reason


@pytest.mark.parametrize("fault", ["crash", "crash_after", "lost"])
@pytest.mark.parametrize(
    ("op", "nth"),
    [("take_lease", 1), ("append", 1), ("append", 2), ("append", 5), ("renew_lease", 1), ("end", 1)],
)
def test_an_attempt_that_dies_at_any_write_is_continued_to_the_same_end(
    op: str, nth: int, fault: str
) -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=300)
    world.ledger.faults.plan[op] = [None] * (nth - 1) + [fault]
    # a clock that moves 2 s per reading makes the lease (30 s) renew every few flushes
    world.clock.step = 2.0 if op == "renew_lease" else 0.0
    world.drain(flush_tokens=16)
    world.clock.step = 0.0
    assert_ended_once(world, job_id)
    assert op in world.ledger.faults.seen


@pytest.mark.parametrize("at_token", [0, 1, 64, 150, 299])
def test_a_provider_crash_at_any_token_resumes_to_the_same_text(at_token: int) -> None:
    world = JobWorld()
    job_id = create(world, metadata={"simulate": {"fault": "crash", "at_token": at_token, "times": 2}})
    outcomes = world.drain()
    assert outcomes[-1] == "done" and len(outcomes) == 3
    job = assert_ended_once(world, job_id)
    assert job.attempts == 3


def test_a_long_job_yields_and_continues_without_spending_its_delivery_budget() -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=2000)
    budget = iter([60_000] * 4 + [1_000] + [60_000] * 4 + [1_000] + [60_000] * 1000)
    outcomes = []
    while (message := world.ledger.receive()) is not None:
        runner = world.runner("acme", flush_tokens=64)
        outcomes.append(
            runner.run(message.job_id, remaining_ms=lambda: next(budget), continuation=message.continuation)
        )
    assert outcomes == [Outcome.YIELD, Outcome.YIELD, Outcome.DONE]  # never a retry: no receive is spent
    job = assert_ended_once(world, job_id)
    assert job.attempts == 3


@pytest.mark.parametrize(
    ("max_tokens", "last_flush"),
    [
        (300, 6),  # chunks at tokens 1, 65, 129, 193, 257, then 300 after the provider's end
        (257, 5),  # the last token's own flush (64 buffered), before the provider's end is read
    ],
)
def test_a_job_whose_answer_ends_inside_the_time_margin_ends_instead_of_yielding(
    max_tokens: int, last_flush: int
) -> None:
    """A flush with under the margin (5 s) left handed the job over at once, even when it wrote the
    answer's last tokens: the continuation called the provider again for nothing and billed its
    input twice. The hand-over now waits for a next token, which a finished answer never has."""
    world = JobWorld()
    job_id = create(world, max_tokens=max_tokens)
    calls = itertools.count(1)
    # The time left is read before the provider's call, then at each flush.
    remaining = lambda: 60_000 if next(calls) <= last_flush else 1_000  # noqa: E731
    message = world.ledger.receive()
    assert message is not None
    outcome = world.runner("acme", flush_tokens=64).run(job_id, remaining_ms=remaining)
    assert outcome is Outcome.DONE and world.ledger.receive() is None  # no continuation
    # Every flush looked at the time left, the one that wrote the end included.
    assert next(calls) == last_flush + 2 and len(list(world.ledger.tenant("acme").all(job_id))) == last_flush
    assert len(world.provider_calls) == 1
    job = assert_ended_once(world, job_id)
    assert job.attempts == 1 and job.usage.input_tokens == job.input_reported["sim-fast"]


def test_a_job_out_of_time_is_handed_over_before_its_next_token() -> None:
    """The other side: under the margin with more answer to come, the job yields with what it wrote,
    and the continuation goes on from there to the same text."""
    world = JobWorld()
    job_id = create(world, max_tokens=300)
    calls = itertools.count(1)
    remaining = lambda: 60_000 if next(calls) != 4 else 1_000  # noqa: E731 - the call's, then 3rd flush
    outcomes = []
    while (message := world.ledger.receive()) is not None:
        runner = world.runner("acme", flush_tokens=64)
        outcomes.append(runner.run(message.job_id, remaining_ms=remaining, continuation=message.continuation))
    assert outcomes == [Outcome.YIELD, Outcome.DONE]
    assert_ended_once(world, job_id)


def test_a_refused_lease_says_what_to_do_with_the_message_without_calling_the_provider() -> None:
    world = JobWorld()
    runner = world.runner("acme")
    assert runner.run("job_missing") is Outcome.DONE  # no such job: the message is dropped
    held = create(world, key="held")
    now = world.clock.ms()
    world.ledger.tenant("acme").take_lease(held, "another-worker", now, now + 30_000)
    assert runner.run(held) is Outcome.RETRY  # another attempt holds it: the message waits
    ended = create(world, key="ended")
    assert runner.run(ended) is Outcome.DONE
    attempts = world.ledger.tenant("acme").get(ended).attempts
    calls = len(world.provider_calls)
    assert runner.run(ended) is Outcome.DONE  # a redelivery of an ended job: done, nothing written
    assert world.ledger.tenant("acme").get(ended).attempts == attempts
    assert len(world.provider_calls) == calls
    assert world.ledger.tenant("acme").get(held).attempts == 1  # only the other worker's take counted


def test_cancel_after_a_crash_never_calls_the_provider_again() -> None:
    world = JobWorld()
    job_id = create(world, metadata={"simulate": {"fault": "crash", "at_token": 100}})
    assert world.ledger.receive() is not None  # the first delivery, run here
    with pytest.raises(BaseException, match="died"):
        world.runner("acme").run(job_id)
    assert world.service("acme").cancel(job_id).cancel_requested
    calls = len(world.provider_calls)
    world.clock.now += 31  # the crashed attempt's lease runs out; its message comes back
    assert world.runner("acme").run(job_id) is Outcome.DONE
    assert len(world.provider_calls) == calls
    job = assert_ended_once(world, job_id, status="cancelled")
    output = world.service("acme").view(job)["output"]
    assert output == "".join(c.text for c in world.ledger.tenant("acme").all(job_id))
    assert job.output is None  # kept out of the job's item: composed from the log
    assert job.usage.output_tokens == 65  # what was persisted before the crash (tokens 65-99 were buffered)


def test_a_fallback_mid_stream_records_where_each_model_took_over_and_prices_each() -> None:
    world = JobWorld()
    throttled = {"simulate": {"fault": "throttle", "at_token": 30, "times": 99, "model": "sim-realtime"}}
    job_id = create(world, model="sim-realtime", max_tokens=100, metadata=throttled)
    world.drain(max_retries=1)
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "completed" and job.fallback_used
    assert [(s.model, s.from_tokens) for s in job.segments] == [("sim-realtime", 0), ("sim-fast", 30)]
    log = list(world.ledger.tenant("acme").all(job_id))
    assert log[job.segments[1].from_sequence_id - 2].tokens_total == 30  # the chunk before the switch
    by_model = {r["model"]: r for r in world.ledger.tenant("acme").rollups("0000", "9999")}
    realtime, fast = world.catalog.resolve("sim-realtime"), world.catalog.resolve("sim-fast")
    assert by_model["sim-realtime"]["output_tokens"] == 30 and by_model["sim-fast"]["output_tokens"] == 70
    assert by_model["sim-realtime"]["cost_nanos"] == realtime.cost_nanos(
        by_model["sim-realtime"]["input_tokens"], 30
    )
    assert by_model["sim-fast"]["cost_nanos"] == fast.cost_nanos(by_model["sim-fast"]["input_tokens"], 70)
    assert job.cost_nanos == by_model["sim-realtime"]["cost_nanos"] + by_model["sim-fast"]["cost_nanos"]
    assert by_model["sim-fast"]["jobs"] + by_model["sim-realtime"]["jobs"] == 1


def test_one_tenants_refused_requests_never_open_the_shared_circuit() -> None:
    world = JobWorld()
    for i in range(6):  # permanent errors: the request itself is refused, the provider is healthy
        create(
            world,
            "noisy",
            f"k{i}",
            model="sim-realtime",
            metadata={"simulate": {"fault": "fatal", "at_token": 1}},
        )
    world.drain()
    assert world.breaker.circuit("sim-realtime").state == "closed"
    clean = create(world, "quiet", model="sim-realtime", max_tokens=20)
    world.drain()
    job = world.ledger.tenant("quiet").get(clean)
    assert job is not None and job.status == "completed" and job.model_resolved == "sim-realtime"


SERVER_ERRORS = {"simulate": {"fault": "server_error", "at_token": 0, "times": 50}}


def _open_the_circuit_of_sim_fast(world: JobWorld, model: str = "sim-fast") -> None:
    """Another tenant's jobs fail on the model's 5xx until its shared circuit opens."""
    for i in range(world.breaker.threshold):
        create(world, "noisy", f"bad{i}", model=model, fallback=False, max_tokens=20, metadata=SERVER_ERRORS)
    world.drain()
    assert world.breaker.circuit(model).state == "open"


def _calling(world: JobWorld, hook: Any) -> Any:
    """``world.provider_for`` whose providers run ``hook`` as each call begins (a stream asked for):
    the moment a probe's call is under way."""
    make = world.provider_for

    def provider_for(model: Any) -> Any:
        provider = make(model)
        stream = provider.stream

        def calling(request: Any, resume: Any) -> Any:
            hook()
            return stream(request, resume)

        provider.stream = calling
        return provider

    return provider_for


def test_a_job_whose_every_circuit_is_open_waits_for_the_cool_down_instead_of_failing() -> None:
    """A queued job whose chain had every circuit open when a worker picked it up failed at once,
    model_unavailable with no call made: it waits for the earliest circuit's probe instead."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    opened_at = world.breaker.circuit("sim-fast").opened_at_ms
    calls_before = len(world.provider_calls)
    job_id = create(world, "quiet", max_tokens=20)
    assert world.drain() == ["yield", "done"]
    job = assert_ended_once(world, job_id, tenant="quiet")
    assert job.model_resolved == "sim-fast" and job.attempts == 2
    assert world.provider_calls[calls_before:] == ["sim-fast"]  # called once, after the cool-down
    assert world.clock.ms() >= opened_at + world.breaker.cooldown * 1000
    assert world.breaker.circuit("sim-fast").state == "closed"  # its probe succeeded


def test_a_job_held_by_open_circuits_keeps_its_slot_and_its_message_is_delayed_to_the_probe() -> None:
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    probe_at = world.breaker.circuit("sim-fast").opened_at_ms + int(world.breaker.cooldown * 1000)
    world.clock.now += 10  # the job is picked up 10 s into the 30 s cool-down
    job_id = create(world, "quiet", max_tokens=20)
    message = world.ledger.receive()
    assert message is not None
    outcome = world.runner("quiet").run(message.job_id)
    assert outcome is Outcome.YIELD
    job = world.ledger.tenant("quiet").get(job_id)
    assert job is not None and job.status == "running" and job.lease_expires_ms == 0  # handed over
    assert running(world.ledger, "quiet") == 1  # its slot (and its reservation) stay held
    assert world.ledger.messages == []
    [(visible_at, delayed)] = world.ledger.delayed
    assert visible_at == probe_at  # 20 s: the rest of the cool-down
    assert delayed.job_id == job_id and delayed.circuit_wait_since_ms == world.clock.ms()


def test_a_job_waiting_on_open_circuits_never_waits_past_its_lease_and_holds_up_no_lost_message() -> None:
    """Its delayed message is no backlog for the sweeper (which re-sent nothing while it waited, so a
    lost message of another job waited for the circuits too), and it is never delayed past the lease,
    so the sweeper never takes the waiting job itself for a forgotten one."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    world.breaker.cooldown = 600
    waiting = create(world, "quiet", max_tokens=20)
    lost = create(world, "other", max_tokens=20, model="sim-realtime")
    message = world.ledger.receive()
    assert message is not None and message.job_id == waiting
    world.ledger.messages.clear()  # the other job's message is lost
    runner = world.runner("quiet", lease_ms=200_000, circuit_wait_seconds=900)
    assert runner.run(waiting) is Outcome.YIELD
    [(visible_at, _)] = world.ledger.delayed
    assert visible_at == world.clock.ms() + 200_000  # the lease, not the 600 s cool-down
    world.clock.now += 121
    assert world.sweeper(running_grace_ms=2 * 200_000 + 60_000).sweep() == [lost]
    world.clock.now += 80  # the waiting job's message is due: a backlog again
    assert world.ledger.waiting() == 2 and world.sweeper().sweep() == []


def test_the_jobs_waiting_on_a_circuit_send_one_probe_and_the_others_wait_for_it() -> None:
    """All were delayed to the same probe time: each was let through the half-open circuit, and into
    a provider still down each would have spent its retries and failed. The others are skipped while
    the probe is under way, delayed to its end, and run once its first token closed the circuit."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    jobs = [create(world, "quiet", f"w{i}", max_tokens=20) for i in range(3)]
    for _ in jobs:  # each finds the circuit open and waits for its probe
        message = world.ledger.receive()
        assert message is not None and world.runner("quiet").run(message.job_id) is Outcome.YIELD
    world.clock.now = world.ledger.next_visible_ms() / 1000  # type: ignore[operator]
    probe, *others = [world.ledger.receive() for _ in jobs]
    assert probe is not None and all(others)
    calls_before, during_probe = len(world.provider_calls), []

    def others_picked_up() -> None:  # while the probe's call is under way
        if not during_probe:
            during_probe.extend(world.runner("quiet").run(m.job_id) for m in others)  # type: ignore[union-attr]

    world.provider_for = _calling(world, others_picked_up)
    assert world.runner("quiet").run(probe.job_id) is Outcome.DONE
    assert during_probe == [Outcome.YIELD, Outcome.YIELD]  # skipped, not called
    assert world.provider_calls[calls_before:] == ["sim-fast"]
    assert world.breaker.circuit("sim-fast").state == "closed"
    world.drain()
    store = world.ledger.tenant("quiet")
    assert [store.get(j).status for j in jobs] == ["completed"] * 3  # type: ignore[union-attr]
    settled = [s.job_id for _, s in world.ledger.settlements]
    assert [settled.count(j) for j in jobs] == [1, 1, 1] and running(world.ledger, "quiet") == 0
    assert world.provider_calls[calls_before:] == ["sim-fast"] * 3


def test_a_job_at_its_wait_bound_during_another_jobs_probe_waits_for_the_probes_answer() -> None:
    """Skipped for a probe under way, a job whose bound had come failed model_unavailable beside a
    provider that was back (the probe's first token came a moment later): it hears the probe out."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    cools_at = world.breaker.circuit("sim-fast").opened_at_ms + 30_000
    prober, late = create(world, "quiet", "p", max_tokens=20), create(world, "quiet", "j", max_tokens=20)
    world.clock.now = (cools_at - 20_000) / 1000
    for _ in range(2):  # both wait for the cool-down; the late one may wait 22 s, up to 2 s past it
        m = world.ledger.receive()
        assert m is not None and world.runner("quiet", circuit_wait_seconds=22).run(m.job_id) is Outcome.YIELD
    world.clock.now = cools_at / 1000
    messages = {m.job_id: m for m in (world.ledger.receive() for _ in range(2)) if m}
    during_probe: list[Outcome] = []

    def late_picked_up() -> None:  # at its bound, the probe's call under way
        if not during_probe:
            world.clock.now += 2
            since = messages[late].circuit_wait_since_ms
            during_probe.append(
                world.runner("quiet", circuit_wait_seconds=22).run(late, circuit_wait_since_ms=since)
            )

    world.provider_for = _calling(world, late_picked_up)
    assert world.runner("quiet").run(prober) is Outcome.DONE
    assert during_probe == [Outcome.YIELD]  # not failed: delayed to the probe's end
    [(visible_at, _)] = world.ledger.delayed
    assert visible_at == cools_at + 10_000
    world.drain(circuit_wait_seconds=22)
    store = world.ledger.tenant("quiet")
    assert [store.get(j).status for j in (prober, late)] == ["completed", "completed"]  # type: ignore[union-attr]


def test_a_job_waits_on_open_circuits_only_up_to_its_bound_then_fails_naming_them() -> None:
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    world.breaker.cooldown = 600  # longer than the job may wait
    calls_before = len(world.provider_calls)
    job_id = create(world, "quiet", max_tokens=20)
    started = world.clock.ms()
    # Picked up every lease (30 s) to find the circuit still open, and last at its bound, not at the probe.
    assert world.drain(circuit_wait_seconds=120) == ["yield"] * 4 + ["done"]
    assert world.clock.ms() == started + 120_000
    assert world.provider_calls[calls_before:] == []
    job = assert_ended_once(world, job_id, status="failed", tenant="quiet")
    error = job.error
    assert error is not None and error["code"] == "model_unavailable"
    probe_at = world.breaker.circuit("sim-fast").opened_at_ms + 600_000
    closes = rfc3339(from_epoch(probe_at / 1000))
    assert f"sim-fast (circuit open until {closes})" in error["message"]
    assert "waited 120 s" in error["message"]
    assert error["details"]["tried"] == [{"model": "sim-fast", "skipped": "circuit open", "retry_at": closes}]
    assert error["details"]["circuit_wait_seconds"] == 120


def test_a_crash_between_the_circuit_hand_over_and_its_message_loses_nothing() -> None:
    """As a yield: the lease is released before the delayed message is sent, and a worker that dies in
    between leaves its own message, which comes back and runs the job."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    job_id = create(world, "quiet", max_tokens=20)
    world.ledger.faults.plan["send"] = ["crash"]
    outcomes = world.drain()
    assert outcomes[0] == "failed: crash before send" and outcomes[-1] == "done"
    assert_ended_once(world, job_id, tenant="quiet")


def test_a_job_waiting_for_open_circuits_is_cancelled_at_once_and_its_message_then_dropped() -> None:
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    job_id = create(world, "quiet", max_tokens=20)
    message = world.ledger.receive()
    assert message is not None and world.runner("quiet").run(message.job_id) is Outcome.YIELD
    assert world.service("quiet").cancel(job_id).status == "cancelled"  # no worker holds it
    assert world.drain() == ["done"]  # the delayed message finds it ended
    assert_ended_once(world, job_id, status="cancelled", tenant="quiet")


def test_a_job_whose_fallback_was_called_fails_as_before_when_every_circuit_is_open_after() -> None:
    """Only a chain that nothing of was called waits: a call that failed is the job's answer."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    job_id = create(world, "quiet", model="sim-realtime", max_tokens=20, metadata=SERVER_ERRORS)
    assert world.drain() == ["done"]
    job = assert_ended_once(world, job_id, status="failed", tenant="quiet")
    assert job.error is not None and job.error["code"] == "model_unavailable"
    assert [t["model"] for t in job.error["details"]["tried"]] == ["sim-realtime", "sim-fast"]


def test_a_slow_store_makes_chunks_larger_never_one_token_each() -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=640)

    def slow_write() -> None:  # each chunk write takes 300 ms, longer than the flush interval
        world.clock.now += 0.3

    world.ledger.on_append = slow_write
    world.drain()
    log = list(world.ledger.tenant("acme").all(job_id))
    assert all(c.tokens > 1 for c in log[1:-1]), [c.tokens for c in log]


def test_dead_letters_end_every_job_once_whatever_happened() -> None:
    world = JobWorld()
    dead = world.dead_letters("acme")
    leased = create(
        world, "acme", "k1", metadata={"simulate": {"fault": "crash", "at_token": 50, "times": 9}}
    )
    with pytest.raises(BaseException, match="died"):
        world.runner("acme").run(leased)
    assert dead.handle(leased) is Outcome.RETRY  # its lease is alive: look again later
    world.clock.now += 31
    assert dead.handle(leased, request_id="dlq-req-1") is Outcome.DONE
    job = world.ledger.tenant("acme").get(leased)
    assert job is not None and job.error is not None and job.error["code"] == "delivery_failed"
    assert job.error["request_id"] == "dlq-req-1"  # the invocation whose log tells what happened
    assert job.error["details"]["last_sequence_id"] == len(list(world.ledger.tenant("acme").all(leased)))
    assert dead.handle(leased) is Outcome.DONE  # a duplicate dead letter does nothing
    assert dead.handle("job_missing") is Outcome.DONE

    orphan = create(world, "acme", "k2")  # its model left the registry (D1): no loop, the job ends
    world.ledger.jobs[("acme", orphan)]["model_resolved"] = "gone-model"
    world.ledger.jobs[("acme", orphan)]["segments"] = [{"model": "gone-model"}]
    assert dead.handle(orphan) is Outcome.DONE
    stuck = create(world, "acme", "k3")  # its settled end is refused at every receive: it still ends
    world.ledger.faults.plan["end"] = ["error"] * 3
    assert receives(world, dead, stuck, 3) == [Outcome.RETRY] * 2 + [Outcome.DONE]
    assert {world.ledger.tenant("acme").get(j).status for j in (orphan, stuck)} == {"failed"}  # type: ignore[union-attr]
    (bare,) = [s for _, s in world.ledger.settlements if s.job_id == stuck]
    assert bare.usage == () and bare.bucket_deltas == () and bare.release_slot  # the slot alone
    assert running(world.ledger, "acme") == 0
    world.ledger.messages.clear()


def receives(world: JobWorld, dead: Any, job_id: str, count: int) -> list[Outcome]:
    """The dead letter received ``count`` times, the dead-letter queue's visibility timeout apart."""
    outcomes = []
    for _ in range(count):
        outcomes.append(dead.handle(job_id))
        world.clock.now += 30
    return outcomes


def _dead_letter_of_a_crashed_job(world: JobWorld, key: str) -> str:
    """A job whose worker died after writing part of its answer, its lease run out: its dead letter."""
    job_id = create(world, "acme", key, metadata={"simulate": {"fault": "crash", "at_token": 50, "times": 9}})
    with pytest.raises(BaseException, match="died"):
        world.runner("acme").run(job_id)
    world.clock.now += 31
    world.ledger.messages.clear()
    return job_id


@pytest.mark.parametrize("fault", ["error", "lost", "crash", "crash_after"])
def test_a_dead_letter_whose_settled_end_fails_once_settles_it_at_its_next_receive(fault: str) -> None:
    """A passing failure (a throttled call after botocore's retries, a reply lost) is not the job's
    end: the dead letter comes back, and the job's reservation is settled and its usage counted once.
    Ending bare at once never gave the reservation back nor counted what the job wrote."""
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    world.ledger.faults.plan["end"] = [fault]
    if fault.startswith("crash"):  # the function died: its dead letter comes back
        with pytest.raises(Crash):
            dead.handle(job_id)
    else:  # refused, or applied with its reply lost (a retry of it finds its own end)
        assert dead.handle(job_id) is Outcome.RETRY
    world.clock.now += 30
    assert dead.handle(job_id) is Outcome.DONE
    job = assert_ended_once(world, job_id, status="failed")
    assert job.error["code"] == "delivery_failed"
    assert job.usage.output_tokens > 0  # what its log holds (assert_ended_once), counted and billed
    (settlement,) = [s for _, s in world.ledger.settlements if s.job_id == job_id]
    assert [u.output_tokens for u in settlement.usage] == [job.usage.output_tokens]  # not a bare end


def test_a_dead_letter_whose_log_cannot_be_read_ends_the_job_bare_at_its_last_receive() -> None:
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    store = world.ledger.tenant("acme")
    with patch.object(TenantLedger, "last", side_effect=ConnectionError("the store did not answer")):
        outcomes = receives(world, dead, job_id, 3)
    assert outcomes == [Outcome.RETRY] * 2 + [Outcome.DONE]
    job = store.get(job_id)
    assert job is not None and job.status == "failed" and job.error is not None
    assert job.error["details"]["last_sequence_id"] == job.progress.last_sequence_id
    assert running(world.ledger, "acme") == 0  # the slot released, whatever else could not be settled


def test_the_sweeper_leaves_a_job_to_its_dead_letter_while_its_receives_last() -> None:
    """The dead letter arrives about a lease after the last attempt, and the sweeper sends a running
    job idle for a lease and a minute back to the workers: counted from the dead letter's first
    receive, its retries would outlast that. Each receive is activity."""
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    sweeper = world.sweeper()
    world.clock.now += sweeper.settings.running_grace_ms / 1000 - 40  # the dead letter comes late
    world.ledger.faults.plan["end"] = ["error"]
    assert dead.handle(job_id) is Outcome.RETRY
    world.clock.now += 60  # past the grace counted from the last lease
    assert sweeper.sweep() == []  # not sent to the workers again
    assert dead.handle(job_id) is Outcome.DONE
    assert_ended_once(world, job_id, status="failed")


def test_two_dead_letters_of_one_job_share_its_window() -> None:
    """A hand-over that sent its continuation and died leaves two messages for one job, and both can
    end in the dead letters: counted per receive, the two halved the time a failure had to pass."""
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    world.ledger.faults.plan["end"] = ["error"] * 4
    for _ in range(2):  # both letters at each receive, a visibility timeout apart
        assert [dead.handle(job_id), dead.handle(job_id)] == [Outcome.RETRY] * 2
        world.clock.now += 30
    assert dead.handle(job_id) is Outcome.DONE  # the window passed: settled, the failure gone
    assert_ended_once(world, job_id, status="failed")
    assert dead.handle(job_id) is Outcome.DONE


def test_a_lease_taken_since_starts_the_window_anew() -> None:
    """Dead letters, then the job sent to a worker again (a message it still had), which died: the
    new dead letter has the whole window for a failure to pass, not what the last one left."""
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    world.ledger.faults.plan["end"] = ["error"] * 2
    assert receives(world, dead, job_id, 2) == [Outcome.RETRY] * 2
    with pytest.raises(BaseException, match="died"):
        world.runner("acme").run(job_id)
    world.ledger.messages.clear()
    world.clock.now += 31
    world.ledger.faults.plan["end"] = ["error"]
    assert receives(world, dead, job_id, 2) == [Outcome.RETRY, Outcome.DONE]
    assert_ended_once(world, job_id, status="failed")
    (settlement,) = [s for _, s in world.ledger.settlements if s.job_id == job_id]
    assert settlement.usage  # settled, not ended bare


def test_the_window_is_the_settle_window() -> None:
    world = JobWorld()
    dead = world.dead_letters("acme")
    job_id = _dead_letter_of_a_crashed_job(world, "k1")
    world.ledger.faults.plan["end"] = ["error"] * 3
    assert dead.handle(job_id) is Outcome.RETRY
    world.clock.now += SETTLE_WINDOW_MS / 1000 - 0.01
    assert dead.handle(job_id) is Outcome.RETRY
    world.clock.now += 0.01
    assert dead.handle(job_id) is Outcome.DONE  # its settled end refused again: bare
    assert running(world.ledger, "acme") == 0


def test_a_job_whose_model_left_the_registry_fails_at_once() -> None:
    world = JobWorld()
    job_id = create(world)
    world.ledger.jobs[("acme", job_id)]["model_resolved"] = "gone-model"
    world.ledger.jobs[("acme", job_id)]["segments"] = [{"model": "gone-model"}]
    assert world.runner("acme").run(job_id, request_id="worker-req-1") is Outcome.DONE
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.error is not None and job.error["code"] == "model_not_found"
    assert job.error["request_id"] == "worker-req-1"  # the invocation that failed it
    assert running(world.ledger, "acme") == 0


def test_the_sweeper_sends_nothing_while_messages_wait_in_the_queue() -> None:
    world = JobWorld()
    forgotten = create(world, key="k1")
    world.ledger.messages.clear()  # its message never left
    waiting = create(world, key="k2")  # its message waits behind busy workers
    world.clock.now += 121
    assert world.sweeper().sweep() == []  # the backlog may hold any queued job's message
    assert [m.job_id for m in world.ledger.messages] == [waiting]  # nothing added to it
    world.drain()
    assert world.sweeper().sweep() == [forgotten]  # drained: the lost one is sent again
    world.drain()
    store = world.ledger.tenant("acme")
    assert [store.get(j).status for j in (waiting, forgotten)] == ["completed", "completed"]  # type: ignore[union-attr]
    settled = [s.job_id for _, s in world.ledger.settlements]
    assert settled.count(waiting) == settled.count(forgotten) == 1
    assert running(world.ledger, "acme") == 0


def test_the_sweeper_queues_forgotten_jobs_only() -> None:
    world = JobWorld()
    forgotten = create(world, key="k1")
    world.ledger.messages.clear()  # its message never left
    assert world.sweeper().sweep() == []  # too early: a queued job is picked up within seconds
    world.clock.now += 121
    assert world.sweeper().sweep() == [forgotten]
    assert world.sweeper().sweep() == []  # touched: not again before the grace passes anew
    world.drain()
    assert_ended_once(world, forgotten)
    assert world.sweeper().sweep() == []  # ended: out of the index


def test_retryable_errors_are_retried_and_fatal_ones_fail_with_the_partial_output() -> None:
    world = JobWorld()
    retried = create(world, "one", metadata={"simulate": {"fault": "throttle", "at_token": 50, "times": 2}})
    fatal = create(world, "two", metadata={"simulate": {"fault": "fatal", "at_token": 100}})
    world.drain()
    assert_ended_once(world, retried, tenant="one")
    failed = assert_ended_once(world, fatal, status="failed", tenant="two")
    assert failed.error["code"] == "provider_error"
    assert failed.error["details"]["tokens_generated"] == 100


def test_the_signals_are_read_at_most_once_per_freshness_window() -> None:
    """A fast model flushes often: the worker reads the job's signals once per 100 ms, not per flush
    (and not before a first token written right after the lease's take, which read them)."""
    world = JobWorld()
    reads: list[float] = []
    original = TenantLedger.signals

    def counted(self: TenantLedger, job_id: str) -> Signals:
        reads.append(world.clock.now)
        return original(self, job_id)

    TenantLedger.signals = counted  # type: ignore[method-assign]
    try:
        still = create(world, max_tokens=640)
        world.drain(flush_tokens=16)
        assert_ended_once(world, still)
        assert reads == []  # the clock did not move: the lease's own read serves every flush
        world.clock.step = 0.03
        moving = create(world, "beta", max_tokens=640)
        world.drain(flush_tokens=16)
        world.clock.step = 0.0
        assert_ended_once(world, moving, tenant="beta")
    finally:
        TenantLedger.signals = original  # type: ignore[method-assign]
    assert len(reads) > 1 and all(b - a >= 0.1 for a, b in itertools.pairwise(reads))


def test_a_job_nobody_subscribed_to_writes_only_its_first_chunk_live() -> None:
    """Only live chunks reach the fanout (the chunk stream's filter in template.yaml): one fanout per
    job for the first chunk, which a client subscribing as the job starts may otherwise miss."""
    world = JobWorld()
    job_id = create(world, max_tokens=640)
    world.drain(flush_tokens=64)
    assert_ended_once(world, job_id)
    log = list(world.ledger.tenant("acme").all(job_id))
    assert len(log) > 2 and [c.live for c in log] == [True] + [None] * (len(log) - 1)


def test_a_subscribed_job_writes_every_chunk_live_from_its_first() -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=300)
    world.ledger.tenant("acme").mark_subscribed(job_id)
    world.drain(flush_tokens=64)
    assert_ended_once(world, job_id)
    log = list(world.ledger.tenant("acme").all(job_id))
    assert log and all(c.live for c in log)


def test_a_job_subscribed_mid_run_goes_live_from_the_next_flush() -> None:
    world = JobWorld()
    job_id = create(world, max_tokens=640)
    store = world.ledger.tenant("acme")
    appended: list[int] = []

    def subscribe_at_the_third_chunk() -> None:
        appended.append(1)
        if len(appended) == 3:
            store.mark_subscribed(job_id)

    world.ledger.on_append = subscribe_at_the_third_chunk
    world.clock.step = 0.2  # flushes further apart than the signals' freshness: each one reads them
    world.drain(flush_tokens=64)
    world.clock.step = 0.0
    assert_ended_once(world, job_id)
    live = [bool(c.live) for c in store.all(job_id)]
    assert live[:3] == [True, False, False]  # the first always; the third before the worker looked
    assert all(live[3:]) and len(live) > 3


def test_every_end_writes_its_end_mark_live_for_a_subscribed_job() -> None:
    """The end mark goes with the end, in the same step: readers of the log see the end in the read
    that sees the last chunks, and for a job with a WebSocket subscriber (live) the chunk stream
    carries ``done`` behind the last chunk."""
    world = JobWorld()
    alone, watched = create(world, "beta", key="alone"), create(world, key="watched")
    world.ledger.tenant("acme").mark_subscribed(watched)
    world.drain()
    assert_ended_once(world, alone, tenant="beta")
    assert ("beta", alone) in world.ledger.end_marks and ("beta", alone) not in world.ledger.live_end_marks
    job = assert_ended_once(world, watched)
    assert ("acme", watched) in world.ledger.live_end_marks
    mark = world.ledger.end_marks[("acme", watched)]
    assert (mark.status, mark.last_sequence_id, mark.cost_nanos) == (
        "completed",
        job.progress.last_sequence_id,
        job.cost_nanos,
    )


def test_a_provider_that_resumes_from_text_gets_what_was_persisted_and_no_read_before_the_first_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider that cannot continue from a token index (an OpenAI-compatible or Bedrock model) is
    given the persisted text on a retry; before an attempt's first chunk nothing is persisted, and the
    log is not read (a first token sooner)."""
    from spool_core.providers.simulated import SimulatedProvider

    resumed: list[tuple[int, str]] = []
    reads: list[str] = []

    class FromText(SimulatedProvider):
        resumes_by_index = False

        def stream(self, request: GenerationRequest, resume: Any) -> Any:
            resumed.append((resume.tokens, resume.text))
            return super().stream(request, resume)

    world = JobWorld()
    world.provider_for = lambda model: FromText(faults_enabled=True, sleep=lambda _: None)
    reading = TenantLedger.all

    def counted(self: TenantLedger, job_id: str) -> Any:
        reads.append(job_id)
        return reading(self, job_id)

    monkeypatch.setattr(TenantLedger, "all", counted)
    job_id = create(world, max_tokens=300, metadata={"simulate": {"fault": "throttle", "at_token": 150}})
    assert world.drain(flush_tokens=16) == ["done"]
    log = list(reading(world.ledger.tenant("acme"), job_id))
    assert len(resumed) == 2 and resumed[0] == (0, "")
    tokens, text = resumed[1]  # the retry after the throttle: every token before it was persisted
    assert tokens == 150 and text == "".join(c.text for c in log if c.tokens_total <= tokens)
    assert len(reads) == 1  # once, for the retry: never for the first call
    assert_ended_once(world, job_id)


# ------------------------------------------------------------------ the context a job was accepted with
def context_job(world: JobWorld) -> tuple[str, str]:
    from spool_core.contexts.model import CreateContextRequest

    created = world._contexts.create(
        CreateContextRequest.model_validate(
            {"files": [{"path": "a.py", "content": "ORIGINAL = 1\n"}], "ttl_seconds": 60}
        )
    )
    return created["context_id"], create(world, max_tokens=300, context_id=created["context_id"])


def prompt_of(world: JobWorld, job_id: str) -> str:
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None
    return "".join(m.content for m in build_messages(lambda: world._contexts, job))


def test_a_job_reads_the_context_it_was_accepted_with_after_a_patch_or_its_expiry() -> None:
    """Every attempt of a job (a retry, a continuation after a hand-off) reads the version admission
    counted: a PATCH after the job was accepted, or the context's expiry, changes nothing of it."""
    from spool_core.contexts.model import PatchContextRequest

    world = JobWorld()
    context_id, job_id = context_job(world)
    world._contexts.patch(
        context_id,
        PatchContextRequest.model_validate({"upsert": [{"path": "a.py", "content": "PATCHED = 2\n"}]}),
    )
    assert "ORIGINAL = 1" in prompt_of(world, job_id) and "PATCHED" not in prompt_of(world, job_id)
    later = create(world, key="after-the-patch", max_tokens=300, context_id=context_id)
    assert "PATCHED = 2" in prompt_of(world, later)  # a job accepted after the PATCH reads it
    world.clock.now += 3_600  # the context expired (ttl 60 s)
    assert "ORIGINAL = 1" in prompt_of(world, job_id)
    assert world.drain() == ["done", "done"]
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "completed", job
    assert "".join(c.text for c in world.ledger.tenant("acme").all(job_id)) == expected_text(world, job_id)


def test_the_context_store_is_made_only_for_a_job_that_names_a_context() -> None:
    """Admission and the worker make the tenant's context store (and load its models: ~12 ms of a cold
    start) only for a job with a ``context_id``; a job without one never does."""
    world = JobWorld()
    create(world, key="no-context", max_tokens=300)
    assert world.drain() == ["done"]
    assert world.context_stores_made == 0
    context_job(world)  # admission counts the context's tokens
    assert world.context_stores_made == 1
    assert world.drain() == ["done"]  # the worker reads its files
    assert world.context_stores_made == 2


def test_a_job_whose_context_was_deleted_fails_saying_so() -> None:
    world = JobWorld()
    context_id, job_id = context_job(world)
    world._contexts.delete(context_id)
    assert world.drain() == ["done"]
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "failed"
    assert job.error is not None and job.error["code"] == "context_not_found"
    assert "deleted" in job.error["message"]


def test_a_job_whose_context_lost_a_file_fails_once_saying_so_and_a_new_upload_heals_it() -> None:
    """A blob gone from the bucket (a lifecycle rule changed, a hand in the console) is no reason to
    retry: the job fails at once, naming the file, and the index forgets the blob, so that creating
    the context again stores the content again."""
    from spool_core.contexts.model import CreateContextRequest

    world = JobWorld()
    _, job_id = context_job(world)
    blobs, index = world._contexts._blobs, world._contexts._index
    (sha,) = blobs.objects  # type: ignore[attr-defined]
    del blobs.objects[sha]  # type: ignore[attr-defined]
    assert world.drain() == ["done"]
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "failed" and job.attempts == 1
    assert job.error is not None and job.error["code"] == "context_file_missing"
    assert job.error["details"]["path"] == "a.py" and "a.py" in job.error["message"]
    assert sha not in index.items  # type: ignore[attr-defined]
    again = world._contexts.create(
        CreateContextRequest.model_validate({"files": [{"path": "a.py", "content": "ORIGINAL = 1\n"}]})
    )
    job_id = create(world, "acme", "k-healed", max_tokens=300, context_id=again["context_id"])
    assert world.drain() == ["done"]
    assert world.ledger.tenant("acme").get(job_id).status == "completed"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("simulate", "named"),
    [
        ({"fault": "crsh", "at_token": 5}, "fault 'crsh' is not one of crash, throttle, server_error, fatal"),
        ({"fault": "fatal", "at_token": "ten"}, "at_token must be a whole number >= 0, not 'ten'"),
        ({"fault": "fatal", "times": True}, "times must be a whole number >= 0"),
        ({"fault": "fatal", "model": 3}, "model must be a model's id"),
        ("crash", "must be an object such as"),
    ],
)
def test_a_fault_the_simulator_cannot_read_fails_the_job_naming_it(simulate: Any, named: str) -> None:
    """Ignored, a mistyped fault would let a test that meant to see one pass; with faults off,
    ``metadata.simulate`` is plain metadata."""
    world = JobWorld()
    job_id = create(world, metadata={"simulate": simulate})
    world.drain()
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "failed" and job.error is not None
    assert job.error["code"] == "provider_error" and named in job.error["message"]
    assert world.breaker.circuit("sim-fast").state == "closed"
    plain = JobWorld(faults_enabled=False)
    job_id = create(plain, metadata={"simulate": simulate})
    plain.drain()
    assert plain.ledger.tenant("acme").get(job_id).status == "completed"  # type: ignore[union-attr]


def test_a_fault_for_any_model_may_say_so_with_a_null_model() -> None:
    world = JobWorld()
    job_id = create(world, metadata={"simulate": {"fault": "fatal", "at_token": 3, "model": None}})
    world.drain()
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.error is not None and "simulated permanent failure" in job.error["message"]


# ------------------------------------------------------------------ usage as the provider reports it
class HalfReported:
    """A simulated model whose provider reports producing half the tokens the worker counts for its
    text (a tokenizer other than the worker's: an OpenAI-compatible server, vLLM, llama.cpp), or
    (``silent``) no output count at all."""

    def __init__(self, *, silent: bool = False) -> None:
        from spool_core.providers.simulated import SimulatedProvider

        self.inner = SimulatedProvider(faults_enabled=True, sleep=lambda _: None)
        self.silent = silent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, request: GenerationRequest, resume: Any) -> Any:
        from spool_core.providers import Finished

        for event in self.inner.stream(request, resume):
            if isinstance(event, Finished):
                reported = None if self.silent or event.output_tokens is None else event.output_tokens // 2
                event = Finished(event.input_tokens, reported, event.stop_reason)
            yield event


@pytest.mark.parametrize(
    ("simulate", "billed"),
    [
        (None, 250),  # one call: its report
        # a call cut at 150 (its tokens counted), then its retry's report: half of the other 350
        ({"fault": "throttle", "at_token": 150}, 150 + 175),
    ],
)
def test_output_usage_is_what_the_provider_reported_and_the_count_only_where_no_report_came(
    simulate: dict[str, Any] | None, billed: int
) -> None:
    world = JobWorld()
    world.provider_for = lambda model: HalfReported()  # type: ignore[assignment,return-value]
    job_id = create(world, max_tokens=500, metadata={"simulate": simulate} if simulate else {})
    assert world.drain(flush_tokens=16) == ["done"]
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "completed"
    assert job.progress.tokens_generated == 500  # the log's own count, the position a resume uses
    assert job.usage.output_tokens == billed
    assert job.cost_nanos == world.catalog.resolve("sim-fast").cost_nanos(job.usage.input_tokens, billed)
    rollups = world.ledger.tenant("acme").rollups("0000", "9999")
    assert sum(r["output_tokens"] for r in rollups) == billed


def test_a_provider_that_reports_no_output_count_is_billed_the_workers_count() -> None:
    """A usage chunk without completion_tokens read as 0: the job was billed no output at all."""
    world = JobWorld()
    world.provider_for = lambda model: HalfReported(silent=True)  # type: ignore[assignment,return-value]
    job_id = create(world, max_tokens=300)
    assert world.drain() == ["done"]
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.usage.output_tokens == job.progress.tokens_generated == 300


# ------------------------------------------------------------------ messages too large for a job item
@pytest.mark.parametrize("size", [20_000, 300_000])
def test_messages_too_large_for_the_item_go_to_the_store_and_the_worker_reads_them(size: int) -> None:
    """A job item is written at admission, at each lease and at the end, billed by its size: messages
    over 8 KB go to S3 once, and the item keeps their SHA-256 (a 192 KB prompt was refused with 413)."""
    world = JobWorld()
    system = {"role": "system", "content": "Be brief."}
    long = {"role": "user", "content": "word " * (size // 5)}
    job_id = create(world, message=None, messages=[system, long], max_tokens=200, key="big")
    stored = world.ledger.tenant("acme").get(job_id)
    assert stored is not None and stored.messages_blob is not None
    # none on the item: code that does not know messages_blob refuses it, never runs on part of it
    assert stored.request.messages == []
    assert world.drain() == ["done"]
    assert world.request_store("acme").gets == 1  # the worker's one read
    assert_ended_once(world, job_id)  # the simulated answer is seeded by the whole prompt
    again = world.service("acme").create(
        "big", JobRequest.model_validate({"messages": [system, long], "model": "sim-fast", "max_tokens": 200})
    )
    assert again.job.job_id == job_id and again.replayed  # the same request under its key
    small = create(world, message="short", key="small")
    assert world.ledger.tenant("acme").get(small).messages_blob is None  # kept on the item
    lone = JobWorld()  # one user message alone
    alone = create(lone, message="word " * (size // 5), max_tokens=50, key="alone")
    assert lone.ledger.tenant("acme").get(alone).request.messages == []
    assert lone.drain() == ["done"]
    assert_ended_once(lone, alone)


def test_without_a_store_messages_over_what_an_item_holds_are_a_413_naming_them() -> None:
    """(With one, a model's window is reached long before its 4 MB: 200,000 tokens are ~0.8 MB.)"""
    from spool_core.errors import PayloadTooLarge
    from spool_core.jobs.stored import MAX_INLINE_ONLY_BYTES

    world = JobWorld()
    service = world.service()
    service._requests = None
    body = {"message": "word " * (MAX_INLINE_ONLY_BYTES // 5 + 1), "model": "sim-fast", "max_tokens": 10}
    with pytest.raises(PayloadTooLarge) as caught:
        service.create("k", JobRequest.model_validate(body))
    assert caught.value.details["param"] == "messages"
    assert caught.value.details["limit_bytes"] == MAX_INLINE_ONLY_BYTES


def test_stored_messages_that_cannot_be_stored_or_read_are_clear_errors_and_a_refusal_stores_none() -> None:
    from spool_core.errors import DependencyUnavailable
    from spool_core.limits.errors import RateLimited

    long = "word " * 4_000
    world = JobWorld(limits=TenantLimits(200_000, 10_000_000, 1))
    create(world, message="one at a time", key="first")
    with pytest.raises(RateLimited):  # refused by a limit: nothing put in S3
        create(world, message=long, key="second")
    assert world.request_store("acme").objects == {}

    broken = JobWorld()
    store = broken.request_store("acme")
    store.put = lambda data: (_ for _ in ()).throw(OSError("S3 is down"))  # type: ignore[method-assign]
    with pytest.raises(DependencyUnavailable) as unavailable:  # a 503: retry with the same key
        create(broken, message=long, key="k")
    assert "Idempotency-Key" in unavailable.value.suggestions[0]
    assert running(broken.ledger, "acme") == 0

    expired = JobWorld()
    job_id = create(expired, message=long, max_tokens=20, key="k")
    expired.request_store("acme").objects.clear()  # the bucket's expiry of the tenants' prefix
    assert expired.drain() == ["done"]  # at once, not at each delivery until the dead letters
    job = expired.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "failed" and job.error is not None
    assert job.error["code"] == "job_messages_missing"


class _StallsOnce:
    """The simulated provider, whose first call stops sending after ``at_token`` tokens (before its
    first token at 0; ``stalled`` is set then) until ``release`` is set, and then ends (a provider
    stream that hangs) or, with ``goes_on``, goes on (a provider that pauses); later calls answer
    normally."""

    def __init__(self, world: JobWorld, at_token: int, *, goes_on: bool = False) -> None:
        self.inner = world.provider_for
        self.at_token = at_token
        self.goes_on = goes_on
        self.calls = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    def __call__(self, model: Any) -> Any:
        provider = self.inner(model)
        stalls = self

        class Provider:
            name, supports_prefill, resumes_by_index = "simulated", True, True

            def stream(self, request: Any, resume: Any) -> Any:
                stalls.calls += 1
                first = stalls.calls == 1
                for index, event in enumerate(provider.stream(request, resume)):
                    if first and index == stalls.at_token:
                        stalls.stalled.set()
                        stalls.release.wait(30)
                        if not stalls.goes_on:
                            return
                    yield event

        return Provider()


@pytest.mark.parametrize("remaining", [None, 600_000])
def test_a_provider_that_stops_sending_is_retried_from_what_was_persisted(remaining: int | None) -> None:
    """A stalled stream held the read until the HTTP client's timeout, the worker's whole time limit,
    so the invocation died mid-read and the job waited out its message's visibility. After the stall
    limit the call is now a retryable error, and the retry goes on from the persisted text."""
    world = JobWorld()
    world.provider_for = stalls = _StallsOnce(world, at_token=100)
    job_id = create(world, max_tokens=300)
    assert world.ledger.receive() is not None
    runner = world.runner("acme", flush_tokens=64, stall_seconds=0.05)
    try:
        outcome = runner.run(job_id, remaining_ms=None if remaining is None else lambda: remaining)
    finally:
        stalls.release.set()
    assert outcome is Outcome.DONE and world.ledger.receive() is None
    assert stalls.calls == 2
    job = assert_ended_once(world, job_id)
    assert job.attempts == 1


def test_a_provider_stalled_at_the_time_limit_hands_the_job_over_instead_of_dying_with_it() -> None:
    """Stalled with less time left than the stall limit: the invocation hands the job over before
    its time runs out, and the continuation finishes it."""
    world = JobWorld()
    world.provider_for = stalls = _StallsOnce(world, at_token=100)
    job_id = create(world, max_tokens=300)
    margin = world.runner("acme").settings.time_margin_ms
    left = iter([margin + 50])  # the first call's: 50 ms before the margin, then plenty
    outcomes = []
    try:
        while (message := world.ledger.receive()) is not None:
            runner = world.runner("acme", flush_tokens=64, stall_seconds=60)
            remaining = lambda: next(left, 600_000)  # noqa: E731
            outcomes.append(
                runner.run(message.job_id, remaining_ms=remaining, continuation=message.continuation)
            )
    finally:
        stalls.release.set()
    assert outcomes == [Outcome.YIELD, Outcome.DONE]
    assert stalls.calls == 2
    job = assert_ended_once(world, job_id)
    assert job.attempts == 2


class _Hangs:
    """A provider whose calls numbered in ``hangs`` (from 1) accept the request and send nothing
    (until the test ends); the others answer as the simulated provider does. With ``model``, only
    that model's calls are counted and hang."""

    def __init__(self, world: JobWorld, hangs: Iterable[int], model: str | None = None) -> None:
        import threading

        self.inner, self.hangs, self.calls, self.model = world.provider_for, set(hangs), 0, model
        self.release = threading.Event()
        self.models: list[str] = []  # each call's model

    def __call__(self, model: Any) -> Any:
        inner, outer = self.inner(model), self

        class Provider:
            name, supports_prefill, resumes_by_index = "simulated", True, True

            def stream(self, request: Any, resume: Any) -> Any:
                outer.models.append(model.id)
                if outer.model in (None, model.id):
                    outer.calls += 1
                    if outer.calls in outer.hangs:
                        outer.release.wait(30)
                        return
                yield from inner.stream(request, resume)

        return Provider()


def _invocations(world: JobWorld, provider: _Hangs, invocations: int) -> list[Outcome | str]:
    """Up to ``invocations`` of the worker, each with 1 s before its time margin (scaled down, with
    a 0.6 s stall limit: 60 s of a 105 s invocation)."""
    import time

    outcomes = []
    try:
        for _ in range(invocations):
            message = world.ledger.receive()
            if message is None:
                break
            runner = world.runner("acme", stall_seconds=0.6)
            ends_at = time.monotonic() + (runner.settings.time_margin_ms + 1000) / 1000
            try:
                outcomes.append(
                    runner.run(
                        message.job_id,
                        remaining_ms=lambda: int((ends_at - time.monotonic()) * 1000),  # noqa: B023
                        continuation=message.continuation,
                        stalled_at=message.stalled_at,
                    )
                )
            except Crash:  # the invocation died: its message comes back as it was
                outcomes.append("crash")
                world.clock.now += 31  # the lease (30 s) runs out
                world.ledger.messages.insert(0, message)
    finally:
        provider.release.set()
    return outcomes


def test_a_provider_that_never_sends_fails_the_job_instead_of_handing_it_over_forever() -> None:
    """The call stalls, its retry waits until the time runs out, and each hand-over did the same in
    the next invocation, a new message each time that never reached the dead letters: the job held
    its slot forever. Twice in a row, the job now fails, naming the stall."""
    world = JobWorld()
    world.provider_for = hangs = _Hangs(world, hangs=range(1, 100))
    job_id = create(world, max_tokens=50)
    assert _invocations(world, hangs, 5) == [Outcome.YIELD, Outcome.DONE]
    assert hangs.calls == 3  # a stalled call and its retry the time ran out on; a stall again
    job = assert_ended_once(world, job_id, status="failed")
    assert (
        job.error["code"] == "model_unavailable" and job.error["details"]["last_error"] == "provider_stalled"
    )
    assert "sim-fast sent nothing for 0.6 s, in two invocations in a row" in job.error["message"]


def test_a_model_that_stalls_in_two_invocations_hands_the_job_to_its_fallback() -> None:
    """A stall, a hand-over, and a stall again from the same log failed the job without trying its
    model's fallbacks: the fallback takes over now, within the invocation."""
    world = JobWorld()
    world.provider_for = hangs = _Hangs(world, hangs=range(1, 100), model="sim-realtime")
    job_id = create(world, model="sim-realtime", max_tokens=50)
    assert _invocations(world, hangs, 5) == [Outcome.YIELD, Outcome.DONE]
    assert hangs.models == ["sim-realtime", "sim-realtime", "sim-realtime", "sim-fast"]
    _assert_served_by(world, job_id, ["sim-realtime", "sim-fast"])


def _cannot_call(world: JobWorld, *models: str) -> Any:
    """``provider_for`` as a deployment that cannot call ``models`` has it (their key's variable is
    missing): what ``bootstrap.provider_for`` raises then."""
    from spool_core.providers import ProviderMisconfigured

    inner = world.provider_for

    def provider_for(model: Any) -> Any:
        if model.id in models:
            raise ProviderMisconfigured(
                f"{model.id} cannot be called: The API key reference 'env:K' names a variable the "
                "function's environment lacks",
                ["Set K where the function runs"],
            )
        return inner(model)

    return provider_for


@pytest.mark.parametrize("fallback", [True, False])
def test_a_model_the_deployment_cannot_call_fails_its_job_at_once_saying_what_to_fix(fallback: bool) -> None:
    """A missing key failed every attempt, each message back after its visibility timeout, until the
    dead letter ended the job with a bare internal error. It fails at the first attempt now, with the
    fix, and the model's circuit is left alone: the provider is not at fault."""
    world = JobWorld()
    world.provider_for = _cannot_call(world, "sim-realtime", "sim-fast")
    job_id = create(world, model="sim-realtime", max_tokens=50, fallback=fallback)
    assert world.drain() == ["done"]
    job = assert_ended_once(world, job_id, status="failed")
    assert job.attempts == 1
    error = job.error
    assert error["code"] == "model_unavailable"
    assert error["details"]["last_error"] == "provider_misconfigured"
    assert "names a variable the function's environment lacks" in error["message"]
    # no "retry later": it would not help; what would, with fallback off, is the model's fallbacks
    allow = 'Allow fallback (omit "fallback": false) to use the model\'s fallback chain'
    assert error["suggestions"] == ["Set K where the function runs"] + ([] if fallback else [allow])
    tried = [t["model"] for t in error["details"]["tried"]]
    assert tried == (["sim-realtime", "sim-fast"] if fallback else ["sim-realtime"])
    assert world.breaker.circuit("sim-realtime").failures == world.breaker.circuit("sim-fast").failures == 0


def test_a_model_the_deployment_cannot_call_hands_its_job_to_the_fallback() -> None:
    world = JobWorld()
    world.provider_for = _cannot_call(world, "sim-realtime")
    job_id = create(world, model="sim-realtime", max_tokens=50)
    assert world.drain() == ["done"]
    _assert_served_by(world, job_id, ["sim-realtime", "sim-fast"])  # the first wrote nothing
    assert [s.job_id for _, s in world.ledger.settlements].count(job_id) == 1
    assert world.breaker.circuit("sim-realtime").failures == 0


@pytest.mark.parametrize(
    ("cannot_call", "open_"), [("sim-realtime", "sim-fast"), ("sim-fast", "sim-realtime")]
)
def test_a_model_the_deployment_cannot_call_leaves_its_job_to_wait_for_one_it_can(
    cannot_call: str, open_: str
) -> None:
    """Every model of the chain the deployment can call had its circuit open, and the one it cannot
    call made the job fail at once: it waits for the open one's probe, as a job whose whole chain is
    open does, and the model it cannot call is never switched to."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world, open_)
    world.provider_for = _cannot_call(world, cannot_call)
    job_id = create(world, "quiet", model="sim-realtime", max_tokens=20)
    assert world.drain() == ["yield", "done"]
    job = world.ledger.tenant("quiet").get(job_id)
    assert job is not None and job.status == "completed" and job.model_resolved == open_
    assert [s.model for s in job.segments] == list(dict.fromkeys(["sim-realtime", open_]))
    assert [s.job_id for _, s in world.ledger.settlements].count(job_id) == 1
    assert running(world.ledger, "quiet") == 0


def test_a_model_skipped_for_its_open_circuit_is_not_made() -> None:
    """Made before its circuit was asked, a model skipped for its open circuit cost a secret read at
    each pickup, and one that failed to be made (a throttled read) ended the attempt where its
    fallback would have served the job."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world, "sim-realtime")
    make, made = world.provider_for, []

    def provider_for(model: Any) -> Any:
        made.append(model.id)
        if model.id == "sim-realtime":
            raise RuntimeError("Rate exceeded (ThrottlingException)")
        return make(model)

    world.provider_for = provider_for
    job_id = create(world, "quiet", model="sim-realtime", max_tokens=20)
    assert world.drain() == ["done"]
    assert made == ["sim-fast"]
    job = world.ledger.tenant("quiet").get(job_id)
    assert job is not None and job.status == "completed" and job.model_resolved == "sim-fast"


def test_a_job_at_its_wait_bound_says_which_model_the_deployment_cannot_call() -> None:
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    world.provider_for = _cannot_call(world, "sim-realtime")
    job_id = create(world, "quiet", model="sim-realtime", max_tokens=20)
    message = world.ledger.receive()
    assert message is not None
    assert world.runner("quiet", circuit_wait_seconds=0).run(message.job_id) is Outcome.DONE
    job = assert_ended_once(world, job_id, status="failed", tenant="quiet")
    message_text = job.error["message"]
    assert "sim-realtime cannot be called" in message_text
    assert "every circuit of the models it can call is open, sim-fast (circuit open until" in message_text
    assert (
        job.error["suggestions"][0]
        == "Retry after the circuits' retry_at, when the providers are probed again"
    )
    assert "Set K where the function runs" in job.error["suggestions"]


def test_a_model_the_deployment_cannot_call_takes_no_probe_of_its_circuit() -> None:
    """Its circuit open and cooled down, the model took the probe and never made the call that would
    answer it: the circuit stayed half open, and the next jobs waited for a probe nobody made."""
    world = JobWorld()
    _open_the_circuit_of_sim_fast(world)
    world.clock.now += world.breaker.cooldown + 1
    world.provider_for = _cannot_call(world, "sim-fast")
    job_id = create(world, "quiet", max_tokens=20)
    assert world.drain() == ["done"]
    assert_ended_once(world, job_id, status="failed", tenant="quiet")
    assert world.breaker.circuit("sim-fast").state == "open"  # as it was: no probe taken


def _assert_served_by(world: JobWorld, job_id: str, models: list[str]) -> None:
    job = world.ledger.tenant("acme").get(job_id)
    assert job is not None and job.status == "completed" and job.fallback_used
    assert [s.model for s in job.segments] == models
    log = list(world.ledger.tenant("acme").all(job_id))
    assert [c.sequence_id for c in log] == list(range(1, len(log) + 1))  # no gap, no duplicate
    assert sum(c.tokens for c in log) == job.usage.output_tokens


def test_a_continuation_goes_on_with_the_fallback_that_took_over() -> None:
    """Handed over while its fallback was serving it: the next invocation goes on with the fallback
    (the job's resolved model), never back to the model that failed it."""
    world = JobWorld()
    throttled = {"simulate": {"fault": "throttle", "at_token": 10, "times": 99, "model": "sim-realtime"}}
    job_id = create(world, model="sim-realtime", max_tokens=200, metadata=throttled)
    # the fallback sends nothing until the invocation's time runs out (a stall, and its retry)
    world.provider_for = hangs = _Hangs(world, hangs=[1, 2], model="sim-fast")
    assert _invocations(world, hangs, 5) == [Outcome.YIELD, Outcome.DONE]
    _assert_served_by(world, job_id, ["sim-realtime", "sim-fast"])
    handed_over = hangs.models.index("sim-fast")
    assert hangs.models[handed_over:] == ["sim-fast", "sim-fast", "sim-fast"]


def test_a_provider_that_stalls_once_gets_a_whole_invocation_after_it() -> None:
    """A transient stall, and a retry that would have answered a little after the time ran out: the
    job failed after a single stall. Once is handed over, and the next invocation finishes it."""
    world = JobWorld()
    world.provider_for = hangs = _Hangs(world, hangs=[1, 2])
    job_id = create(world, max_tokens=50)
    assert _invocations(world, hangs, 5) == [Outcome.YIELD, Outcome.DONE]
    assert_ended_once(world, job_id)


def test_an_answer_read_to_its_end_as_the_time_runs_out_is_ended_not_handed_over() -> None:
    """Its last event was waiting to be read when the deadline passed (each write of the log taking
    half a second here): it was handed over, and a continuation would have asked the provider
    again."""
    import time

    world = JobWorld()
    job_id = create(world, max_tokens=3)
    world.ledger.on_append = lambda: time.sleep(0.5)
    assert world.ledger.receive() is not None
    runner = world.runner("acme", flush_tokens=1, flush_ms=1)
    ends_at = time.monotonic() + (runner.settings.time_margin_ms + 1000) / 1000  # during the 3rd write
    outcome = runner.run(job_id, remaining_ms=lambda: int((ends_at - time.monotonic()) * 1000))
    assert outcome is Outcome.DONE and world.ledger.receive() is None
    assert_ended_once(world, job_id)


def test_a_job_settled_after_its_tenants_limit_changed_moves_the_bucket_at_the_new_scale() -> None:
    """Raised from 5,000 to 100,000 a day while a 4,000-token reservation was out, then 80,000 more
    reserved: the first job's refund, at the old limit's scale, freed ~76,000 tokens the others held."""
    from spool_core.limits.service import RateLimiter, set_tenant_limits

    world = JobWorld()
    store = world.ledger.tenant("acme")
    small = TenantLimits(tokens_per_minute=100_000_000, tokens_per_day=5_000, max_concurrent_jobs=50)
    set_tenant_limits(store, small, defaults=world.limits, now=world.clock.ms())
    first = create(world, key="first", max_tokens=4_000)
    big = small._replace(tokens_per_day=100_000)
    set_tenant_limits(store, big, defaults=world.limits, now=world.clock.ms())
    others = [create(world, key=f"other{i}", max_tokens=4_000) for i in range(20)]
    held = sum(world.ledger.tenant("acme").get(j).reservation["tokens"] for j in others)
    world.service("acme").cancel(first)  # nothing used: its reservation comes back

    day = RateLimiter.buckets(big)[1]
    left = day.remaining(store.state(None, "x").tats["day"], world.clock.ms() * 1000)
    assert left == 100_000 - held


def _live_reservations(world: JobWorld, job_ids: list[str]) -> int:
    jobs = [world.ledger.tenant("acme").get(j) for j in job_ids]
    return sum(j.reservation["tokens"] for j in jobs if j.status in ("queued", "running"))


def _fill(world: JobWorld, prefix: str, tokens: int) -> list[str]:
    """Jobs of ``tokens`` until the limits refuse one."""
    from spool_core.limits.errors import RateLimited

    made = []
    with contextlib.suppress(RateLimited):
        for i in range(100):
            made.append(create(world, key=f"{prefix}{i}", max_tokens=tokens))
    return made


@pytest.mark.parametrize(
    ("defaults_per_day", "before_per_day", "after_per_day", "seconds_between"),
    [
        (100_000, None, 5_000, 0),  # from the deployment's defaults to lower limits of its own
        (10_000_000, 100_000, 5_000, 1_000),  # its own limit lowered long after the reservation
    ],
)
def test_a_refund_after_a_limit_change_never_lets_reservations_past_the_new_limit(
    defaults_per_day: int, before_per_day: int | None, after_per_day: int, seconds_between: int
) -> None:
    """A second reviewer: a refund at the current limit's scale after a move from the defaults
    (which moves no bucket) gave back 20 times too much, and a refund counting the time since the
    reservation at the new, slower rate gave back what had refilled at the old one."""
    from spool_core.limits.service import set_tenant_limits

    world = JobWorld(limits=TenantLimits(100_000_000, defaults_per_day, 50))
    store = world.ledger.tenant("acme")
    if before_per_day is not None:
        set_tenant_limits(
            store, TenantLimits(100_000_000, before_per_day, 50), defaults=world.limits, now=world.clock.ms()
        )
    first = create(world, key="first", max_tokens=4_000)
    world.clock.now += seconds_between
    set_tenant_limits(
        store, TenantLimits(100_000_000, after_per_day, 50), defaults=world.limits, now=world.clock.ms()
    )
    others = _fill(world, "before", 400)
    world.service("acme").cancel(first)  # nothing used
    others += _fill(world, "after", 400)
    assert _live_reservations(world, others) <= after_per_day


def test_a_refund_after_a_reset_to_the_defaults_gives_the_reservation_back() -> None:
    """Reset from 5,000 a day of its own to the defaults' 10 million with a job out: its refund at
    the defaults' scale left ~8 million tokens held by nothing for most of the day."""
    from spool_core.limits.service import RateLimiter, set_tenant_limits

    world = JobWorld(limits=TenantLimits(100_000_000, 10_000_000, 50))
    store = world.ledger.tenant("acme")
    set_tenant_limits(
        store, TenantLimits(100_000_000, 5_000, 50), defaults=world.limits, now=world.clock.ms()
    )
    first = create(world, key="first", max_tokens=4_000)
    set_tenant_limits(store, None, defaults=world.limits, now=world.clock.ms())  # `spool limits reset`
    world.service("acme").cancel(first)
    day = RateLimiter.buckets(world.limits)[1]
    assert day.remaining(store.state(None, "x").tats["day"], world.clock.ms() * 1000) == 10_000_000


def test_a_stalled_continuation_redelivered_after_progress_does_not_fail_the_job() -> None:
    """A third reviewer: invocation 1 stalled and handed over; invocation 2 wrote tokens and died;
    its message, saying the job had stalled, came back, and invocation 3's single transient stall
    failed the job "in two invocations in a row". The message now says from which log length the
    stall was, and a job that wrote since is not failed for it."""
    world = JobWorld()
    world.provider_for = hangs = _Hangs(world, hangs=[1, 2, 4, 5])
    job_id = create(
        world, max_tokens=50, metadata={"simulate": {"fault": "crash", "at_token": 20, "times": 2}}
    )
    assert _invocations(world, hangs, 6) == [Outcome.YIELD, "crash", Outcome.YIELD, Outcome.DONE]
    assert_ended_once(world, job_id)


@pytest.mark.parametrize(
    "history",
    [
        (5_000, 100_000),  # from the defaults to limits of its own, then raised
        (None, 5_000),  # back to the defaults, then limits of its own
        (5_000, None, 100_000),
        (100_000, None),  # from the defaults down, and back
    ],
)
def test_a_reservation_across_changes_through_the_defaults_never_lets_reservations_past_the_limit(
    history: tuple[int | None, ...],
) -> None:
    """A third reviewer: a move between the deployment's defaults and limits of the tenant's own moved
    no bucket, so a job in flight across defaults -> own -> own (or own -> reset -> own) settled at
    a scale its bucket was not in and over-granted. Every change carries the buckets over now, the
    defaults included, and a settlement is at the scale of the limits that apply."""
    from spool_core.limits.service import set_tenant_limits

    world = JobWorld(limits=TenantLimits(100_000_000, 200_000, 200))
    store = world.ledger.tenant("acme")
    if history[0] is None:  # the reset needs limits of its own to leave
        set_tenant_limits(store, TenantLimits(100_000_000, 20_000, 200), defaults=world.limits)
    first = create(world, key="first", max_tokens=4_000)
    for per_day in history:
        world.clock.now += 60
        own = None if per_day is None else TenantLimits(100_000_000, per_day, 200)
        set_tenant_limits(store, own, defaults=world.limits, now=world.clock.ms())
    limit = history[-1] or world.limits.tokens_per_day
    others = _fill(world, "before", 4_000)
    world.service("acme").cancel(first)  # nothing used: what is outstanding comes back
    others += _fill(world, "after", 4_000)
    assert _live_reservations(world, others) <= limit


def test_a_fallback_that_never_stalled_gets_its_retries_after_the_stalled_models_hand_over() -> None:
    """A reviewer: invocation 1's model stalled and was handed over; its circuit opened meanwhile, and
    invocation 2's first stall of the fallback, which had never stalled, ended the fallback's turn as
    a stall "again", failing a job its retry would have finished."""
    world = JobWorld()
    # calls 1 and 2: sim-realtime's (invocation 1); call 3: sim-fast's first, in invocation 2
    world.provider_for = hangs = _Hangs(world, hangs=[1, 2, 3])
    job_id = create(world, model="sim-realtime", max_tokens=50)
    assert _invocations(world, hangs, 1) == [Outcome.YIELD]
    for _ in range(world.breaker.threshold):  # other tenants' 5xx open sim-realtime's circuit
        world.breaker.record_failure("sim-realtime")
    hangs.release.clear()
    assert _invocations(world, hangs, 5) == [Outcome.DONE]
    assert hangs.models == ["sim-realtime", "sim-realtime", "sim-fast", "sim-fast"]
    _assert_served_by(world, job_id, ["sim-realtime", "sim-fast"])


def test_a_model_that_stalls_at_each_retry_of_one_invocation_is_not_said_to_have_stalled_twice() -> None:
    """With no time limit every retry stalled within one invocation, and the error said the model sent
    nothing "in two invocations in a row"."""
    world = JobWorld()
    world.provider_for = hangs = _Hangs(world, hangs=range(1, 100))
    job_id = create(world, max_tokens=50, fallback=False)
    assert world.ledger.receive() is not None
    try:
        assert world.runner("acme", stall_seconds=0.05).run(job_id) is Outcome.DONE
    finally:
        hangs.release.set()
    job = assert_ended_once(world, job_id, status="failed")
    assert "sim-fast sent nothing for 0.05 s, at each of its calls" in job.error["message"]


WAIT = 30  # seconds: a deadline for what the test waits on, never expected to be reached


@contextlib.contextmanager
def _paused(
    world: JobWorld, job_id: str, pauses: _StallsOnce, **settings: Any
) -> Iterator[tuple[list[Outcome], list[int]]]:
    """The job's message taken and its run started in a thread, until its provider pauses: its outcome
    and heartbeats, as they come. On leaving, the provider goes on and the run is waited for."""
    assert world.ledger.receive() is not None
    runner = world.runner("acme", **settings)
    outcome: list[Outcome] = []
    beats: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id, heartbeat=beats.append)))
    thread.start()
    try:
        assert pauses.stalled.wait(WAIT)
        yield outcome, beats
    finally:
        pauses.release.set()
        thread.join(WAIT)


def test_tokens_that_came_before_a_pause_are_written_within_a_flush_interval() -> None:
    """DESIGN.md: tokens are flushed every SPOOL_FLUSH_MS. The worker wrote its buffer only when the
    next token came: a provider that paused after five tokens left four of them unwritten for the
    whole pause (3 s, in an outside tester's run), and lost them to a stall's retry."""
    world = JobWorld()
    world.provider_for = pauses = _StallsOnce(world, at_token=5, goes_on=True)
    job_id = create(world, max_tokens=40)
    with _paused(world, job_id, pauses, flush_tokens=64) as (outcome, _):
        wait_for(lambda: world.ledger.tenant("acme").last(job_id).tokens_total == 5)  # type: ignore[union-attr]
    assert outcome == [Outcome.DONE] and pauses.calls == 1
    assert_ended_once(world, job_id)


def test_a_silent_provider_is_looked_after_every_flush_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN.md: a cancelled job's worker stops within one flush interval, a provider that has not
    sent its first token included. While it waits, the worker asks to be woken (the stream's
    ``upkeep``) a flush interval after it last looked at its job, on its own clock, not later: a
    second, to spare a signals read, let a cancel wait five flush intervals."""
    from spool_core.jobs import runner as runner_module

    upkeeps: list[Any] = []

    class Watched(runner_module.WatchedStream):  # type: ignore[type-arg]
        def __init__(self, events: Any, **kwargs: Any) -> None:
            upkeeps.append(kwargs["upkeep"])
            super().__init__(events, **kwargs)

    monkeypatch.setattr(runner_module, "WatchedStream", Watched)
    world = JobWorld()
    world.provider_for = pauses = _StallsOnce(world, at_token=0, goes_on=True)
    job_id = create(world, max_tokens=40)
    with _paused(world, job_id, pauses, flush_ms=200) as (outcome, _):
        assert 0 < upkeeps[0]() <= 0.2
        world.service("acme").cancel(job_id)
        world.clock.now += 0.2  # one flush interval
        assert upkeeps[0]() <= 0  # due: at its next wake it reads the cancel
        wait_for(lambda: outcome)  # ended while its provider still pauses
    assert outcome == [Outcome.DONE] and pauses.calls == 1
    assert_ended_once(world, job_id, status="cancelled")


def test_a_first_token_slower_than_the_lease_keeps_the_lease_and_sees_a_cancel() -> None:
    """A model slow to its first token (a local model on a CPU, a reasoning model) held the lease
    without renewing it: past the local stack's 5 s lease another attempt took the job, and the
    provider was called three times before the job was dead-lettered. The worker now looks after
    its job every flush interval while it waits: it renews the lease (and the message's visibility)
    and sees a cancel."""
    world = JobWorld()
    world.provider_for = pauses = _StallsOnce(world, at_token=0, goes_on=True)
    job_id = create(world, max_tokens=40)
    with _paused(world, job_id, pauses, lease_ms=3_000) as (outcome, beats):
        lease = world.ledger.jobs[("acme", job_id)]["lease_expires_ms"]
        world.clock.now += 2  # past a third of the lease, and the signals' freshness
        wait_for(lambda: world.ledger.jobs[("acme", job_id)]["lease_expires_ms"] > lease)
        assert beats  # the message's visibility kept with it
        world.service("acme").cancel(job_id)
        world.clock.now += 1
        wait_for(lambda: outcome)  # ended while its provider still pauses
    assert outcome == [Outcome.DONE] and pauses.calls == 1
    job = assert_ended_once(world, job_id, status="cancelled")
    assert job.progress.tokens_generated == 0
