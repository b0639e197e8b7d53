"""Health of the model providers: circuit state, recent error rate and first-token latency per
model (from the circuit items every worker keeps), and with ``deep`` a real minimal call, cached so
frequent probes cannot burn money."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from spool_core.chat import Message
from spool_core.circuits import CircuitBreaker
from spool_core.clock import rfc3339, utc_now
from spool_core.health import Probe, Unhealthy
from spool_core.models import ModelSpec
from spool_core.providers import (
    GenerationRequest,
    Provider,
    ProviderError,
    ProviderMisconfigured,
    ResumePoint,
    TextDelta,
)

# A provider is failing (health degraded) when its recent error rate reaches this, over at least
# MIN_CALLS calls, well before its circuit opens.
FAILING_ERROR_RATE = 0.25
MIN_CALLS = 2


class DeepProbeCache(Protocol):
    def get(self, key: str) -> Mapping[str, Any] | None: ...

    def put(self, key: str, value: Mapping[str, Any], ttl_seconds: float) -> None: ...


def provider_probes(
    models: list[ModelSpec],
    breaker: CircuitBreaker,
    *,
    deep: bool = False,
    provider_for: Callable[[ModelSpec], Provider] | None = None,
    cache: DeepProbeCache | None = None,
    cache_seconds: float = 60.0,
) -> list[Probe]:
    by_provider: dict[str, list[ModelSpec]] = {}
    for model in models:
        by_provider.setdefault(model.provider, []).append(model)
    return [
        Probe(
            f"provider:{name}",
            _check(name, group, breaker, deep, provider_for, cache, cache_seconds),
            critical=False,
        )
        for name, group in sorted(by_provider.items())
    ]


def _check(
    name: str,
    models: list[ModelSpec],
    breaker: CircuitBreaker,
    deep: bool,
    provider_for: Callable[[ModelSpec], Provider] | None,
    cache: DeepProbeCache | None,
    cache_seconds: float,
) -> Callable[[], Mapping[str, Any]]:
    def check() -> Mapping[str, Any]:
        circuits = breaker.circuits(m.id for m in models)
        report = {model_id: c.public(breaker.cooldown) for model_id, c in circuits.items()}
        facts: dict[str, Any] = {"models": report}
        failing = [
            model_id
            for model_id, r in report.items()
            if r["circuit"] == "open"
            or (r["circuit"] == "half_open" and r["retry_at"])  # calls skipped: a probe under way
            or (r["recent_calls"] >= MIN_CALLS and r["error_rate"] >= FAILING_ERROR_RATE)
        ]
        if deep and provider_for is not None:
            facts["deep"] = _deep(models[0], provider_for, cache, cache_seconds)
            if facts["deep"]["status"] != "ok":
                failing.append(models[0].id)
        if failing:
            raise Unhealthy(f"{name} failing for {', '.join(sorted(set(failing)))}", facts)
        return facts

    return check


def _deep(
    model: ModelSpec,
    provider_for: Callable[[ModelSpec], Provider],
    cache: DeepProbeCache | None,
    cache_seconds: float,
) -> Mapping[str, Any]:
    key = f"health#deep#{model.id}"
    cached = cache.get(key) if cache else None
    if cached:
        return {**cached, "cached": True}
    request = GenerationRequest(
        model.provider_model_id,
        (Message(role="user", content="ping"),),
        1,
        0.0,
        options={**model.options, "tokens_per_second": 0, "first_token_ms": 0},
    )
    started = time.perf_counter()
    try:
        for event in provider_for(model).stream(request, ResumePoint()):
            if isinstance(event, TextDelta):
                break
        result: dict[str, Any] = {
            "status": "ok",
            "model": model.id,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        }
    except ProviderError as exc:
        result = {"status": "down", "model": model.id, "error": exc.code}
        if isinstance(exc, ProviderMisconfigured):  # the operator's to fix: say what
            result["message"] = str(exc)
    result["checked_at"] = rfc3339(utc_now())
    if cache:
        cache.put(key, result, cache_seconds)
    return {**result, "cached": False}
