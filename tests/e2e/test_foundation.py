"""The foundation through real HTTP: health, the error envelope on every path, clean shutdown."""

from __future__ import annotations

import re

from tests.e2e.conftest import RunningStack, start_stack, stop_stack


def assert_envelope(body: dict[str, object], code: str, headers: dict[str, str]) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == code
    assert error["request_id"] == headers["X-Request-Id"]
    assert error["suggestions"]


def test_health_is_200_with_its_checks_and_needs_no_key(dev_stack: RunningStack) -> None:
    status, headers, body = dev_stack.request("GET", "/v1/health", key=None)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["X-Request-Id"])
    assert body["status"] == "ok"
    for name in ("dynamodb", "s3", "queue"):
        assert body["checks"][name]["status"] == "ok"
        assert body["checks"][name]["latency_ms"] >= 0


def test_contexts_without_a_key_is_401_with_the_envelope(dev_stack: RunningStack) -> None:
    status, headers, body = dev_stack.request("GET", "/v1/contexts", key=None)
    assert status == 401
    assert_envelope(body, "unauthorized", headers)
    status, headers, body = dev_stack.request("GET", "/v1/contexts", key="sk-not-a-key")
    assert status == 401


def test_unknown_routes_are_404_and_wrong_methods_405(dev_stack: RunningStack) -> None:
    status, headers, body = dev_stack.request("GET", "/v1/does-not-exist", key=None)
    assert status == 404
    assert_envelope(body, "not_found", headers)
    status, headers, body = dev_stack.request("GET", "/nope", key=None)
    assert status == 404
    assert_envelope(body, "not_found", headers)
    status, headers, body = dev_stack.request("DELETE", "/v1/health", key=None)
    assert status == 405
    assert_envelope(body, "method_not_allowed", headers)
    assert headers["Allow"] == "GET"


def test_sigterm_stops_the_stack_cleanly() -> None:
    stack = start_stack()
    banner = "\n".join(stack.output)
    assert stack.base_url in banner
    assert "sk-e2e-a" in banner
    assert stop_stack(stack) == 0
    assert stack.output[-1].endswith("stopped")


def test_models_are_listed_for_the_tenant_and_health_probes_the_provider(dev_stack: RunningStack) -> None:
    status, _, body = dev_stack.request("GET", "/v1/models")
    assert status == 200
    ids = {m["id"] for m in body["data"]}
    assert {"sim-fast", "sim-realtime"} <= ids
    assert dev_stack.request("GET", "/v1/models", key=None)[0] == 401
    assert dev_stack.request("GET", "/v1/health", key=None)[0] == 200  # the basic check is public
    status, _, health = dev_stack.request("GET", "/v1/health?deep=true", key=None)  # and the deep one
    assert status == 200
    assert health["checks"]["provider:simulated"]["deep"]["status"] == "ok"
