from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from spool_core.health import HealthService, Probe


def ok() -> Mapping[str, Any]:
    return {"depth": 3}


def broken() -> Mapping[str, Any]:
    raise ConnectionError("refused")


def test_all_answering_is_ok_with_latency_and_facts() -> None:
    report = HealthService([Probe("dynamodb", ok), Probe("queue", ok)]).report()
    body = report.as_dict()
    assert body["status"] == "ok"
    assert body["checks"]["queue"]["depth"] == 3
    assert body["checks"]["dynamodb"]["latency_ms"] >= 0
    assert body["checked_at"].endswith("Z")


def test_a_failing_critical_dependency_is_down_and_says_why() -> None:
    report = HealthService([Probe("dynamodb", broken), Probe("s3", ok)]).report()
    assert report.status == "down"
    assert report.checks["dynamodb"].as_dict()["error"] == "ConnectionError: refused"


def test_a_failing_optional_dependency_degrades() -> None:
    report = HealthService([Probe("dynamodb", ok), Probe("provider", broken, critical=False)]).report()
    assert report.status == "degraded"


def test_a_probe_that_hangs_is_reported_down_after_the_timeout() -> None:
    release = threading.Event()

    def hangs() -> Mapping[str, Any]:
        release.wait(5)
        return {}

    try:
        report = HealthService([Probe("s3", hangs)], timeout_seconds=0.05).report()
    finally:
        release.set()
    assert report.status == "down"
    assert "no answer" in (report.checks["s3"].error or "")


def test_a_provider_failing_half_its_calls_degrades_health_before_its_circuit_opens() -> None:
    from spool_core.circuits import CircuitBreaker
    from spool_core.health import HealthService
    from spool_core.models import registry
    from spool_core.provider_health import provider_probes
    from tests.fakes import MemoryCircuitStore

    breaker = CircuitBreaker(MemoryCircuitStore(), threshold=5, clock=lambda: 1_800_000_000.0)
    model = registry().get("sim-realtime")
    assert model is not None
    breaker.record_success(model.id, 120.0)
    breaker.record_failure(model.id)
    assert breaker.circuit(model.id).state == "closed"  # 1 failure of 5: the circuit stays closed
    report = HealthService(provider_probes([model], breaker)).report()
    assert report.status == "degraded"
    facts = report.checks["provider:simulated"].facts["models"][model.id]
    assert (facts["error_rate"], facts["circuit"], facts["retry_at"]) == (0.5, "closed", None)
    for _ in range(5):
        breaker.record_failure(model.id)
    opened = HealthService(provider_probes([model], breaker)).report().checks["provider:simulated"].facts
    assert opened["models"][model.id]["retry_at"] == "2027-01-15T08:00:30.000Z"  # RFC 3339, not epoch


def test_a_deep_probe_of_a_model_the_deployment_cannot_call_says_what_to_fix(monkeypatch: Any) -> None:
    """A missing key variable (``bootstrap.provider_for``'s configuration error) raised past the deep
    probe, which knew only the provider's own errors; it is the model's own error now, one the job's
    chain handles too."""
    import pytest

    from spool_core import bootstrap
    from spool_core.circuits import CircuitBreaker
    from spool_core.models import registry
    from spool_core.provider_health import provider_probes
    from spool_core.providers import ProviderMisconfigured
    from spool_core.settings import Settings
    from tests.fakes import MemoryCircuitStore

    monkeypatch.delenv("SPOOL_TEST_ABSENT_KEY", raising=False)
    required = {f.alias: "x" for f in Settings.model_fields.values() if f.is_required() and f.alias}
    config = Settings.from_env({**required, "SPOOL_OPENAI_API_KEY_PARAMETER": "env:SPOOL_TEST_ABSENT_KEY"})
    model = registry().get("gpt-4o-2024-08-06")
    assert model is not None
    with pytest.raises(
        ProviderMisconfigured, match=r"gpt-4o-2024-08-06 cannot be called.*SPOOL_TEST_ABSENT_KEY"
    ) as e:
        bootstrap.provider_for(model, config)
    assert not e.value.retryable and e.value.code == "provider_misconfigured"
    assert any("SPOOL_TEST_ABSENT_KEY" in fix for fix in e.value.suggestions)
    breaker = CircuitBreaker(MemoryCircuitStore(), clock=lambda: 1_800_000_000.0)
    probes = provider_probes(
        [model], breaker, deep=True, provider_for=lambda m: bootstrap.provider_for(m, config)
    )
    report = HealthService(probes).report()
    assert report.status == "degraded"
    deep = report.checks["provider:openai"].facts["deep"]
    assert deep["status"] == "down" and deep["error"] == "provider_misconfigured"
    assert "SPOOL_TEST_ABSENT_KEY" in deep["message"]


def test_a_cooled_circuit_is_reported_as_a_call_would_find_it_not_open_until_the_next_call() -> None:
    """Health read the stored circuit: once its cool-down had passed it still said ``open``, with a
    ``retry_at`` in the past and the provider down, until a job happened to call the model."""
    from spool_core.circuits import CircuitBreaker
    from spool_core.models import registry
    from spool_core.provider_health import provider_probes
    from tests.fakes import MemoryCircuitStore

    now = [1_800_000_000.0]
    breaker = CircuitBreaker(MemoryCircuitStore(), threshold=5, cooldown_seconds=30, clock=lambda: now[0])
    model = registry().get("sim-realtime")
    assert model is not None
    for _ in range(5):
        breaker.record_failure(model.id)

    def provider() -> Any:
        return HealthService(provider_probes([model], breaker)).report().checks["provider:simulated"]

    assert provider().status == "down" and provider().facts["models"][model.id]["circuit"] == "open"
    now[0] += 31  # cooled: the next call probes the model
    cooled = provider().facts["models"][model.id]
    assert (cooled["circuit"], cooled["retry_at"]) == ("half_open", None)
    assert cooled["error_rate"] == 1.0  # its window (60 s) still holds the failures that opened it
    now[0] += 30  # the window has ended too: nothing recent is known of the model
    report = HealthService(provider_probes([model], breaker)).report()
    facts = report.checks["provider:simulated"].facts["models"][model.id]
    assert (report.status, facts["circuit"], facts["recent_calls"], facts["error_rate"]) == (
        "ok",
        "half_open",
        0,
        0.0,
    )
    assert breaker.circuit(model.id).state == "open"  # reporting it changed nothing stored
