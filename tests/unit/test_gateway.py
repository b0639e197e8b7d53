"""The API Gateway emulator, driven by the real template with in-memory functions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spool.devstack.gateway import RestApiEmulator, Route, _policy_allows
from spool.devstack.runtime import InvocationTimeout, adapter_request
from spool.devstack.template import Template, TemplateError
from tests.fakes import FakeFunction
from tests.support import ROOT, load_event


def allow(event: dict[str, Any]) -> dict[str, Any]:
    key = (event["headers"] or {}).get("Authorization")
    effect = "Allow" if key == "Bearer good" else "Deny"
    return {
        "principalId": "key_1",
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Action": "execute-api:Invoke",
                    "Effect": effect,
                    "Resource": [event["methodArn"].split("/")[0] + "/*/*/*"],
                }
            ],
        },
        "context": {"tenant_id": "acme", "admin": False},
        "usageIdentifierKey": "usage-key-1",  # what a method that requires an API key throttles by
    }


def echo(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "statusCode": 200,
        "multiValueHeaders": {"X-Request-Id": [event["requestContext"]["requestId"]]},
        "body": json.dumps(
            {
                "resource": event["resource"],
                "params": event["pathParameters"],
                "auth": event["requestContext"].get("authorizer"),
            }
        ),
    }


@pytest.fixture
def functions() -> dict[str, FakeFunction]:
    return {
        "AuthorizerFunction": FakeFunction(allow),
        "HealthFunction": FakeFunction(echo),
        "ContextsFunction": FakeFunction(echo),
        "WorkerFunction": FakeFunction(echo),
    }


@pytest.fixture
def emulator(functions: dict[str, FakeFunction]) -> RestApiEmulator:
    template = Template.load(ROOT / "template.yaml")
    return RestApiEmulator(template, "SpoolApi", functions, region="us-east-1", stage="prod")  # type: ignore[arg-type]


def body(response: Any) -> Any:
    return json.loads(response.body)


def test_routes_prefer_literal_segments_over_parameters_over_greedy() -> None:
    routes = [
        Route.build("/{proxy+}", "ANY", "F", False),
        Route.build("/v1/contexts/{id}", "ANY", "C", True),
        Route.build("/v1/contexts/uploads", "ANY", "U", True),
    ]
    emulator = RestApiEmulator.__new__(RestApiEmulator)
    emulator.routes = routes
    assert emulator.match("/v1/contexts/uploads")[0][0].function == "U"
    assert emulator.match("/v1/contexts/ctx_1") == ([routes[1]], {"id": "ctx_1"})
    assert emulator.match("/v1/other/thing")[1] == {"proxy": "v1/other/thing"}
    assert emulator.match("/") == ([], {})


def test_an_authorized_route_gets_the_authorizer_context(emulator: RestApiEmulator, functions: Any) -> None:
    response = emulator.handle("GET", "/v1/contexts/ctx_1?x=1", {"Authorization": "Bearer good"}, b"")
    assert response.status == 200
    seen = body(response)
    assert seen["resource"] == "/v1/contexts/{context_id}"
    assert seen["params"] == {"context_id": "ctx_1"}
    assert seen["auth"]["tenant_id"] == "acme"
    assert seen["auth"]["admin"] == "false"  # API Gateway passes context values as strings
    event = functions["ContextsFunction"].events[0]
    assert event["queryStringParameters"] == {"x": "1"}
    assert set(event) == set(load_event("contexts"))  # the emulator's events have the sample's shape
    assert set(functions["AuthorizerFunction"].events[0]) == set(load_event("authorizer"))


def test_a_denied_key_gets_the_templates_401_envelope(emulator: RestApiEmulator, functions: Any) -> None:
    response = emulator.handle("GET", "/v1/contexts", {"Authorization": "Bearer bad"}, b"")
    assert response.status == 401
    error = body(response)["error"]
    assert error["code"] == "unauthorized"
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert functions["ContextsFunction"].events == []


def test_an_authorizer_that_raises_unauthorized_is_401_and_one_that_breaks_is_500(
    emulator: RestApiEmulator, functions: Any
) -> None:
    def unauthorized(event: Any) -> Any:
        raise Exception("Unauthorized")

    functions["AuthorizerFunction"].behaviour = unauthorized
    assert emulator.handle("GET", "/v1/contexts", {}, b"").status == 401
    functions["AuthorizerFunction"].behaviour = lambda e: {"nonsense": True}
    response = emulator.handle("GET", "/v1/contexts", {}, b"")
    assert response.status == 500
    assert body(response)["error"]["code"] == "internal_error"


def test_public_routes_skip_the_authorizer(emulator: RestApiEmulator, functions: Any) -> None:
    assert emulator.handle("GET", "/v1/health", {}, b"").status == 200
    assert functions["AuthorizerFunction"].events == []


def test_handler_failures_and_timeouts_become_gateway_responses(
    emulator: RestApiEmulator, functions: Any
) -> None:
    def crash(event: Any) -> Any:
        raise RuntimeError("boom")

    functions["HealthFunction"].behaviour = crash
    response = emulator.handle("GET", "/v1/health", {}, b"")
    assert response.status == 502
    assert body(response)["error"]["code"] == "internal_error"

    def slow(event: Any) -> Any:
        raise InvocationTimeout("late")

    functions["HealthFunction"].behaviour = slow
    assert emulator.handle("GET", "/v1/health", {}, b"").status == 504
    functions["HealthFunction"].behaviour = lambda e: "not a proxy response"
    assert emulator.handle("GET", "/v1/health", {}, b"").status == 502


def test_bodies_over_api_gateways_limit_are_413(emulator: RestApiEmulator) -> None:
    response = emulator.handle("POST", "/v1/health", {}, b"x" * (10 * 1024 * 1024 + 1))
    assert response.status == 413
    assert body(response)["error"]["code"] == "payload_too_large"


def test_binary_bodies_are_base64_encoded(emulator: RestApiEmulator, functions: Any) -> None:
    emulator.handle("POST", "/v1/health", {}, b"\xff\xfe")
    event = functions["HealthFunction"].events[0]
    assert event["isBase64Encoded"] is True
    assert event["body"] == "//4="


def test_policy_evaluation_explicit_deny_wins() -> None:
    arn = "arn:aws:execute-api:us-east-1:1:api/prod/GET/v1/x"
    allow_all = {"Effect": "Allow", "Resource": "arn:aws:execute-api:us-east-1:1:api/*/*/*"}
    deny_x = {"Effect": "Deny", "Resource": [arn]}
    assert _policy_allows({"Statement": [allow_all]}, arn)
    assert not _policy_allows({"Statement": [allow_all, deny_x]}, arn)
    assert not _policy_allows({"Statement": []}, arn)


def test_an_api_without_a_default_authorizer_is_rejected_for_unknown_functions() -> None:
    template = Template.load(ROOT / "template.yaml")
    with pytest.raises(KeyError):
        RestApiEmulator(template, "SpoolApi", {}, region="us-east-1", stage="prod")
    with pytest.raises(TemplateError):
        Template.load(ROOT / "events" / "health.json")


def cors_emulator(functions: dict[str, FakeFunction], origins: str) -> RestApiEmulator:
    template = Template.load(ROOT / "template.yaml")
    return RestApiEmulator(
        template,
        "SpoolApi",
        functions,  # type: ignore[arg-type]
        region="us-east-1",
        stage="prod",
        cors_origins=origins,
    )


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/contexts/ctx_1", "/v1/jobs/job_1/events", "/v1/nowhere"])
def test_preflight_is_answered_from_the_template_before_the_authorizer(
    emulator: RestApiEmulator, functions: Any, path: str
) -> None:
    response = emulator.handle(
        "OPTIONS", path, {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}, b""
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in response.headers  # the same for every origin
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert response.headers["X-Request-Id"] == response.headers["x-amzn-RequestId"]  # as every response
    assert all(not f.events for f in functions.values())  # no authorizer, no function


def test_gateway_responses_name_an_allowed_origin_only(functions: Any) -> None:
    emulator = cors_emulator(functions, "https://app.example.com, https://admin.example.com")
    denied = emulator.handle("GET", "/v1/contexts", {"Origin": "https://admin.example.com"}, b"")
    assert denied.status == 401
    assert denied.headers["Access-Control-Allow-Origin"] == "https://admin.example.com"
    assert denied.headers["Vary"] == "Origin"  # it names the request's origin: no cache may share it
    assert "X-Request-Id" in denied.headers["Access-Control-Expose-Headers"]
    allowed = emulator.handle(
        "OPTIONS",
        "/v1/jobs",
        {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        b"",
    )
    assert (allowed.headers["Access-Control-Allow-Origin"], allowed.headers["Vary"]) == (
        "https://app.example.com",
        "Origin",
    )
    foreign = emulator.handle("GET", "/v1/contexts", {"Origin": "https://evil.example"}, b"")
    assert "Access-Control-Allow-Origin" not in foreign.headers
    preflight = emulator.handle("OPTIONS", "/v1/jobs", {"Origin": "https://evil.example"}, b"")
    assert "Access-Control-Allow-Origin" not in preflight.headers
    no_origin = emulator.handle("GET", "/v1/contexts", {}, b"")
    assert "Access-Control-Allow-Origin" not in no_origin.headers


def test_the_adapter_request_carries_the_request_context_and_never_the_clients_copy() -> None:
    event = load_event("stream")
    event["headers"]["x-amzn-request-context"] = '{"authorizer": {"tenant_id": "forged"}}'
    event["multiValueQueryStringParameters"] = {"after": ["3"], "tag": ["a b", "c"]}
    event["body"], event["isBase64Encoded"] = "AAEC", True
    request = adapter_request(event)
    assert request.method == "GET"
    assert request.target == "/v1/jobs/job_unknown/events?after=3&tag=a+b&tag=c"  # no stage prefix
    context = json.loads(request.headers["x-amzn-request-context"])
    assert context["authorizer"]["tenant_id"] == "local"
    assert request.headers["Last-Event-ID"] == "17"
    assert request.body == b"\x00\x01\x02"
    event["headers"].update({"Transfer-Encoding": "chunked", "Content-Length": "99", "Connection": "close"})
    framed = {name.lower() for name in adapter_request(event).headers}
    assert not framed & {"transfer-encoding", "content-length", "connection"}  # the body is whole


def test_streaming_routes_come_from_the_template() -> None:
    template = Template.load(ROOT / "template.yaml")
    events = {e.path: e for e in template.functions()["StreamFunction"].api_events}
    events |= {e.path: e for e in template.functions()["EventsFunction"].api_events}
    assert set(events) == {
        "/v1/jobs/{job_id}/events",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/cancel",
    }
    assert all((e.streaming, e.timeout_ms) == (True, 900_000) for e in events.values())
    assert template.functions()["StreamFunction"].web_app == "app:app"
    assert template.functions()["EventsFunction"].web_app == "events:app"
    assert [e.path for e in template.functions()["EventsFunction"].api_events] == ["/v1/jobs/{job_id}/events"]
    assert not any(e.streaming for e in template.functions()["JobsFunction"].api_events)
