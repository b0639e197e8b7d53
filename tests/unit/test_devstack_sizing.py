"""The local stack sizes its queue workers to the machine, within what the template lets AWS run, and
starts a container at once for a function whose invocation holds it for a job or a stream."""

from __future__ import annotations

import dataclasses

from spool.devstack.stack import MIN_WORKERS, WORKERS_PER_CPU, sized_workers, starts_at_once
from spool.devstack.template import FunctionSpec, SqsEvent, Template
from tests.support import ROOT


def worker(**changes: object) -> FunctionSpec:
    spec = Template.load(ROOT / "template.yaml").functions()["WorkerFunction"]
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def test_the_template_caps_the_jobs_queue_at_worker_max_concurrency() -> None:
    (event,) = worker().sqs_events
    assert event.maximum_concurrency == 50  # WorkerMaxConcurrency's default
    template = Template.load(ROOT / "template.yaml")
    template.overrides = {"WorkerMaxConcurrency": "3"}
    (event,) = template.functions()["WorkerFunction"].sqs_events
    assert event.maximum_concurrency == 3
    (dead_letters,) = template.functions()["DeadLetterFunction"].sqs_events
    assert dead_letters.maximum_concurrency is None


def test_workers_grow_with_the_cpus_up_to_the_templates_caps() -> None:
    assert sized_workers(worker(), cpus=1) == max(MIN_WORKERS, WORKERS_PER_CPU)
    assert sized_workers(worker(), cpus=2) == 2 * WORKERS_PER_CPU
    assert sized_workers(worker(), cpus=64) == 50
    capped = worker(sqs_events=(SqsEvent("Jobs", "JobsQueue", 1, True, maximum_concurrency=3),))
    assert sized_workers(capped, cpus=8) == 3
    assert sized_workers(worker(reserved_concurrency=5), cpus=8) == 5
    assert sized_workers(worker(), cpus=None) >= MIN_WORKERS


def test_only_functions_that_hold_a_container_and_the_fanout_skip_the_wait_for_a_warm_one() -> None:
    functions = Template.load(ROOT / "template.yaml").functions()
    at_once = {name for name, spec in functions.items() if starts_at_once(spec)}
    # The queue consumers (a job each), the SSE and OpenAI-compatible web apps (a stream each), and the
    # fanout (its records wait behind its lane's invocations).
    assert at_once == {
        "WorkerFunction",
        "DeadLetterFunction",
        "EventsFunction",
        "StreamFunction",
        "FanoutFunction",
    }
