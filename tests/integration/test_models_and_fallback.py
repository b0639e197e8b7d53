"""Pinned models, fallback chains, circuit breakers in DynamoDB, and feature-flag rollouts."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from spool.devstack.provision import StackDescription
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.circuits import DynamoCircuitStore
from spool_core.circuits import CircuitBreaker
from spool_core.errors import ModelNotFound
from spool_core.flags import tenant_context
from spool_core.jobs.model import JobRequest
from spool_core.jobs.runner import Outcome
from spool_core.models import registry
from spool_core.tenancy import Tenant
from tests.integration.conftest import drain_dead_letters
from tests.integration.test_jobs import runner_for


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **settings: Any) -> CircuitBreaker:
    config = bootstrap.settings()
    store = DynamoCircuitStore(aws.dynamodb(config), config.system_table)
    return CircuitBreaker(store, clock=clock, **{"threshold": 1, "cooldown_seconds": 30, **settings})


def run(tenant: Tenant, key: str, body: dict[str, Any], **runner: Any) -> Any:
    service = bootstrap.job_service(tenant)
    created = service.create(key, JobRequest.model_validate(body))
    assert runner_for(tenant, **runner).run(created.job.job_id) is Outcome.DONE
    return service.view(service.get(created.job.job_id))


def served(job: dict[str, Any]) -> dict[str, Any]:
    """The job's model as requested and resolved (without the segments of who served what)."""
    return {k: v for k, v in job["model"].items() if k != "segments"}


THROTTLED = {"simulate": {"fault": "throttle", "at_token": 5, "times": 99, "model": "sim-realtime"}}


def test_a_throttled_pinned_model_retries_then_falls_back(stack: StackDescription) -> None:
    job = run(
        Tenant("fb-1"),
        "k",
        {"message": "hi", "model": "sim-chat", "max_tokens": 50, "metadata": THROTTLED},
        breaker=breaker(Clock(), threshold=99),
        max_retries=2,
    )
    assert job["status"] == "completed"
    assert served(job) == {"requested": "sim-chat", "resolved": "sim-fast", "fallback_used": True}
    assert [segment["model"] for segment in job["model"]["segments"]] == ["sim-realtime", "sim-fast"]
    assert job["usage"]["output_tokens"] == 50


def test_fallback_false_fails_with_a_clear_error(stack: StackDescription) -> None:
    body = {
        "message": "hi",
        "model": "sim-realtime",
        "max_tokens": 50,
        "metadata": THROTTLED,
        "fallback": False,
    }
    job = run(Tenant("fb-2"), "k", body, breaker=breaker(Clock(), threshold=99), max_retries=1)
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "model_unavailable"
    assert "fallback is disabled" in error["message"]
    assert error["details"]["tried"] == [
        {"model": "sim-realtime", "error": "provider_throttled", "retryable": True}
    ]
    assert error["details"]["last_sequence_id"] >= 1  # the partial output stays reachable
    assert job["model"]["fallback_used"] is False


def test_an_open_circuit_skips_the_model_until_its_cool_down_ends(stack: StackDescription) -> None:
    clock = Clock()
    shared = breaker(clock, threshold=1, cooldown_seconds=30)
    first = run(
        Tenant("cb"),
        "k1",
        {"message": "a", "model": "sim-realtime", "max_tokens": 20, "metadata": THROTTLED},
        breaker=shared,
        max_retries=0,
    )
    assert first["model"]["resolved"] == "sim-fast"
    assert shared.circuit("sim-realtime").state == "open"

    healthy = {"message": "b", "model": "sim-realtime", "max_tokens": 20}
    skipped = run(Tenant("cb"), "k2", healthy, breaker=shared)
    assert served(skipped) == {"requested": "sim-realtime", "resolved": "sim-fast", "fallback_used": True}

    clock.now += 31  # cool-down over: half-open, the model is tried again and closes the circuit
    retried = run(Tenant("cb"), "k3", {**healthy, "message": "c"}, breaker=shared)
    assert served(retried) == {
        "requested": "sim-realtime",
        "resolved": "sim-realtime",
        "fallback_used": False,
    }
    circuit = shared.circuit("sim-realtime")
    assert circuit.state == "closed"
    assert circuit.public(30)["recent_calls"] >= 1


def test_a_flag_rolls_a_model_out_to_one_tenant_only(stack: StackDescription) -> None:
    outsider = next(
        t for t in (f"tenant-{i}" for i in range(100)) if tenant_context(t)["tenant_hash"] % 100 > 4
    )
    assert bootstrap.catalog(Tenant("beta")).resolve("sim-preview").id == "sim-preview"
    assert bootstrap.catalog(Tenant("beta")).resolve("sim-next").id == "sim-preview"  # the alias too
    with pytest.raises(ModelNotFound) as hidden:
        bootstrap.catalog(Tenant(outsider)).resolve("sim-preview")
    assert "sim-preview" not in hidden.value.details["available"]
    job = run(Tenant("beta"), "k", {"message": "preview", "model": "sim-preview", "max_tokens": 10})
    assert job["model"]["resolved"] == "sim-preview"


def test_flags_change_behaviour_without_a_deploy(
    stack: StackDescription, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags_file = tmp_path / "flags.json"
    flags_file.write_text('{"model_fallback": {"default": false}}')
    monkeypatch.setenv("SPOOL_FLAGS_FILE", str(flags_file))
    body = {"message": "x", "model": "sim-realtime", "max_tokens": 20, "metadata": THROTTLED}
    job = run(Tenant("flagged"), "k1", body, breaker=breaker(Clock(), threshold=99), max_retries=0)
    assert job["error"]["code"] == "model_unavailable"  # the capability is off: no fallback
    flags_file.write_text('{"model_fallback": {"default": true}}')
    job = run(
        Tenant("flagged"),
        "k2",
        {**body, "message": "y"},
        breaker=breaker(Clock(), threshold=99),
        max_retries=0,
    )
    assert job["status"] == "completed"


def test_health_goes_degraded_when_a_provider_fails_and_back(invoke: Any, stack: StackDescription) -> None:
    from tests.support import load_event, response_json

    drain_dead_letters(stack)  # other tests' dead letters
    config = bootstrap.settings()  # forget what the other tests (on their own clocks) left in the circuit
    aws.dynamodb(config).delete_item(TableName=config.system_table, Key={"pk": {"S": "circuit#sim-realtime"}})
    shared = bootstrap.circuit_breaker()
    for _ in range(shared.threshold):
        shared.record_failure("sim-realtime")
    response = invoke("HealthFunction", load_event("health"))
    body = response_json(response)
    assert response["statusCode"] == 200  # a failing provider degrades, it does not take Spool down
    assert body["status"] == "degraded"
    provider = body["checks"]["provider:simulated"]
    assert provider["status"] == "down"
    assert provider["models"]["sim-realtime"]["circuit"] == "open"
    assert provider["models"]["sim-realtime"]["error_rate"] == 1.0
    for _ in range(4 * shared.threshold):  # the provider recovers: the circuit closes, the error rate falls
        shared.record_success("sim-realtime", 12.0)
    body = response_json(invoke("HealthFunction", load_event("health")))
    assert body["status"] == "ok"
    assert body["checks"]["provider:simulated"]["models"]["sim-realtime"]["latency_ms"] == 12.0


def test_health_and_models_report_a_cooled_circuit_as_half_open(invoke: Any, stack: StackDescription) -> None:
    """A circuit that opened ten minutes ago (30 s cool-down, 60 s window), with no call since: the
    functions read it from the system table as the next call would find it, not as it was stored."""
    import time

    from tests.support import load_event, response_json

    config = bootstrap.settings()
    key = {"pk": {"S": "circuit#sim-realtime"}}
    aws.dynamodb(config).delete_item(TableName=config.system_table, Key=key)
    clock = Clock()
    clock.now = time.time() - 600
    opened = breaker(clock, threshold=5)
    try:
        for _ in range(opened.threshold):
            opened.record_failure("sim-realtime")
        assert opened.circuit("sim-realtime").state == "open"  # as stored, until a call probes it
        body = response_json(invoke("HealthFunction", load_event("health")))
        reported = body["checks"]["provider:simulated"]["models"]["sim-realtime"]
        assert (reported["circuit"], reported["retry_at"], reported["recent_errors"]) == (
            "half_open",
            None,
            0,
        )
        listed = response_json(invoke("ModelsFunction", load_event("models")))
        assert {m["id"]: m["status"] for m in listed["data"]}["sim-realtime"] == "available"
    finally:  # other tests read this circuit on their own clocks
        aws.dynamodb(config).delete_item(TableName=config.system_table, Key=key)


def forget_deep_probes(stack: StackDescription) -> None:
    """Delete the deep health checks' shared cache entries (one per model, in the system table)."""
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.endpoint_url, region_name=stack.region)
    table = bootstrap.settings().system_table
    for model in registry().all():
        dynamodb.delete_item(TableName=table, Key={"pk": {"S": f"health#deep#{model.id}"}})


def test_deep_health_makes_a_real_call_and_caches_it(invoke: Any, stack: StackDescription) -> None:
    from tests.support import load_event, response_json

    event = load_event("health")
    event["queryStringParameters"] = {"deep": "true"}
    event["multiValueQueryStringParameters"] = {"deep": ["true"]}
    forget_deep_probes(stack)  # another test's deep check may have left one cached
    first = response_json(invoke("HealthFunction", event))["checks"]["provider:simulated"]["deep"]
    second = response_json(invoke("HealthFunction", event))["checks"]["provider:simulated"]["deep"]
    assert first["status"] == "ok"
    assert first["cached"] is False
    assert second["cached"] is True
    assert second["checked_at"] == first["checked_at"]
