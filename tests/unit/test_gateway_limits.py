"""API Gateway's limits in the emulator: the stage's method throttle, API keys and the usage plan's
per-key throttle, and the authorizer's result cache, driven by a small template and a fake clock."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spool.devstack.gateway import AuthorizerCache, RestApiEmulator, TokenBucket, retry_after
from spool.devstack.template import Template, Throttle, WebSocketThrottles
from tests.fakes import FakeFunction
from tests.support import ROOT

TEMPLATE = """\
Transform: AWS::Serverless-2016-10-31
Parameters:
  TenantRequestRateLimit:
    Type: Number
    Default: 1
  TenantRequestBurstLimit:
    Type: Number
    Default: 2
  WebSocketRateLimit:
    Type: Number
    Default: 50
Resources:
  Api:
    Type: AWS::Serverless::Api
    Properties:
      StageName: prod
      ApiKeySourceType: AUTHORIZER
      MethodSettings:
        - ResourcePath: "/*"
          HttpMethod: "*"
          ThrottlingBurstLimit: 4
          ThrottlingRateLimit: 2
        - ResourcePath: "/~1slow"
          HttpMethod: "*"
          ThrottlingBurstLimit: 1
          ThrottlingRateLimit: 0.5
      Cors:
        AllowMethods: "'GET,POST'"
      Auth:
        DefaultAuthorizer: Keys
        ApiKeyRequired: true
        Authorizers:
          Keys:
            FunctionArn: !GetAtt AuthFunction.Arn
            FunctionPayloadType: REQUEST
            Identity:
              ReauthorizeEvery: 0
        UsagePlan:
          CreateUsagePlan: PER_API
          Throttle:
            RateLimit: !Ref TenantRequestRateLimit
            BurstLimit: !Ref TenantRequestBurstLimit
      GatewayResponses:
        THROTTLED:
          StatusCode: 429
          ResponseParameters:
            Headers:
              X-Request-Id: context.requestId
              Retry-After: "'1'"
          ResponseTemplates:
            application/json: |-
              {"error": {"code": "rate_limited", "message": "Too many requests", "details": {},
                "suggestions": ["Retry later"], "request_id": "$context.requestId"}}
        DEFAULT_4XX:
          ResponseParameters:
            Headers:
              X-Request-Id: context.requestId
          ResponseTemplates:
            application/json: |-
              {"error": {"code": "invalid_request", "message": $context.error.messageString,
                "details": {}, "suggestions": ["Check the request"], "request_id": "$context.requestId"}}
  AuthFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/authorizer/
      Handler: app.handler
  AppFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/app/
      Handler: app.handler
      Events:
        Things:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /things
            Method: ANY
        Other:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /other
            Method: ANY
        Slow:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /slow
            Method: ANY
        Health:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /health
            Method: GET
            Auth:
              Authorizer: NONE
              ApiKeyRequired: false
  WebSocketApi:
    Type: AWS::ApiGatewayV2::Api
    Properties:
      ProtocolType: WEBSOCKET
      RouteSelectionExpression: "$request.body.action"
  WebSocketStage:
    Type: AWS::ApiGatewayV2::Stage
    Properties:
      ApiId: !Ref WebSocketApi
      StageName: prod
      DefaultRouteSettings:
        ThrottlingRateLimit: !Ref WebSocketRateLimit
        ThrottlingBurstLimit: 100
      RouteSettings:
        subscribe:
          ThrottlingBurstLimit: 3
"""


class Clock:
    """Time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant_authorizer(event: dict[str, Any]) -> dict[str, Any]:
    """Allows every request; the key in x-test-key becomes the usage identifier ('-' for none)."""
    key = (event["headers"] or {}).get("x-test-key", "-")
    return {
        "principalId": key,
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [
                {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": event["methodArn"]}
            ],
        },
        "context": {"tenant_id": key},
        **({} if key == "-" else {"usageIdentifierKey": f"usage-{key}"}),
    }


def ok(event: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "body": json.dumps({"resource": event["resource"]})}


def write_template(tmp_path: Path, text: str = TEMPLATE) -> Template:
    path = tmp_path / "template.yaml"
    path.write_text(text)
    return Template.load(path)


def emulator_for(
    tmp_path: Path, functions: dict[str, FakeFunction], clock: Clock, text: str = TEMPLATE
) -> RestApiEmulator:
    template = write_template(tmp_path, text)
    return RestApiEmulator(template, "Api", functions, region="r", stage="prod", clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def functions() -> dict[str, FakeFunction]:
    return {"AuthFunction": FakeFunction(tenant_authorizer), "AppFunction": FakeFunction(ok)}


@pytest.fixture
def emulator(tmp_path: Path, functions: dict[str, FakeFunction], clock: Clock) -> RestApiEmulator:
    return emulator_for(tmp_path, functions, clock)


def call(emulator: RestApiEmulator, path: str, key: str | None = "a", method: str = "GET") -> Any:
    return emulator.handle(method, path, {"x-test-key": key} if key else {}, b"")


# ---------------------------------------------------------------------- the template
def test_the_template_declares_throttles_keys_and_the_usage_plan(tmp_path: Path) -> None:
    template = write_template(tmp_path)
    spec = template.rest_api("Api")
    assert spec.api_key_source == "AUTHORIZER"
    assert spec.api_key_required is True
    assert spec.api_key_required_on_preflight is True  # SAM's default
    assert spec.usage_plan_throttle == Throttle(rate=1.0, burst=2)  # !Ref resolved to the defaults
    assert spec.method_throttle("/things", "ANY") == Throttle(rate=2.0, burst=4)
    assert spec.method_throttle("/slow", "GET") == Throttle(rate=0.5, burst=1)  # its own setting wins
    assert spec.authorizers["Keys"].function == "AuthFunction"
    assert spec.authorizers["Keys"].reauthorize_every == 0
    events = {e.name: e for e in template.functions()["AppFunction"].api_events}
    assert events["Health"].api_key_required is False
    assert events["Things"].api_key_required is None  # the API's default

    template.overrides = {"TenantRequestRateLimit": "7.5", "TenantRequestBurstLimit": "15"}
    assert template.rest_api("Api").usage_plan_throttle == Throttle(rate=7.5, burst=15)


def test_websocket_stage_throttles_come_from_default_route_settings(tmp_path: Path) -> None:
    throttles = write_template(tmp_path).websocket_throttles()
    assert throttles.default == Throttle(rate=50.0, burst=100)
    # A setting left out is API Gateway's account-level value.
    assert throttles.for_route("subscribe") == Throttle(rate=10_000.0, burst=3)
    assert throttles.for_route("$default") == throttles.default


def test_a_template_without_any_of_it_has_no_limits(tmp_path: Path) -> None:
    template = write_template(
        tmp_path,
        textwrap.dedent(
            """\
            Resources:
              Api:
                Type: AWS::Serverless::Api
                Properties:
                  StageName: prod
            """
        ),
    )
    spec = template.rest_api("Api")
    assert (spec.api_key_source, spec.api_key_required, spec.usage_plan_throttle) == ("HEADER", False, None)
    assert spec.method_throttle("/x", "GET") is None
    assert spec.default_authorizer is None
    assert template.websocket_throttles() == WebSocketThrottles()


def test_the_projects_template_reads() -> None:
    template = Template.load(ROOT / "template.yaml")
    spec = template.rest_api("SpoolApi")
    assert spec.method_throttle("/v1/jobs", "ANY") == Throttle(rate=100.0, burst=200)
    assert spec.authorizers[spec.default_authorizer or ""].reauthorize_every == 0
    template.websocket_throttles()  # declared or not, it reads


# ---------------------------------------------------------------------- token buckets
def test_a_token_bucket_allows_its_burst_then_refills_at_its_rate(clock: Clock) -> None:
    bucket = TokenBucket(Throttle(rate=2.0, burst=3), clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token in half a second
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    clock.now += 100
    after_a_long_pause = [bucket.take() for _ in range(4)]
    assert after_a_long_pause[:3] == [0.0, 0.0, 0.0]
    assert after_a_long_pause[3] > 0  # never more than the burst


def test_a_bucket_that_never_holds_a_token_throttles_everything(clock: Clock) -> None:
    assert TokenBucket(Throttle(rate=5.0, burst=0), clock).take() == float("inf")
    assert retry_after(float("inf")) == "3600"
    assert retry_after(0.01) == "1"
    assert retry_after(2.2) == "3"


# ---------------------------------------------------------------------- the stage's throttle
def test_the_stage_throttles_each_method_after_the_clients_own_plan(
    emulator: RestApiEmulator, functions: dict[str, FakeFunction], clock: Clock
) -> None:
    # Four keys, so the usage plan (burst 2 per key) is not what throttles.
    assert [call(emulator, "/things", key=f"k{i}").status for i in range(4)] == [200] * 4
    throttled = call(emulator, "/things", key="k9")
    assert throttled.status == 429
    error = json.loads(throttled.body)["error"]
    assert error["code"] == "rate_limited"
    assert error["request_id"] == throttled.headers["X-Request-Id"]
    assert throttled.headers["Retry-After"] == "1"  # 2 tokens a second: the next in 0.5 s, rounded up
    assert len(functions["AppFunction"].events) == 4  # the throttled request never reached the function
    assert call(emulator, "/other", key="k9").status == 200  # another method, another bucket
    clock.now += 1  # the stage's bucket and k9's own (which both requests above spent) refill
    assert call(emulator, "/things", key="k9").status == 200


def test_a_client_over_its_own_plan_leaves_the_stages_share_to_the_others(
    emulator: RestApiEmulator, functions: dict[str, FakeFunction]
) -> None:
    """API Gateway applies the usage plan before the stage's method throttle: a flooder's refused
    requests spend its own bucket only, so the stage (burst 4) still serves the quiet clients."""
    flood = [call(emulator, "/things", key="flood").status for _ in range(50)]
    assert flood.count(200) == 2 and flood.count(429) == 48  # its plan's burst, then refused
    assert [call(emulator, "/things", key=f"quiet{i}").status for i in range(2)] == [200, 200]


def test_a_method_setting_overrides_the_stage_wide_one(emulator: RestApiEmulator, clock: Clock) -> None:
    assert call(emulator, "/slow", key="a").status == 200
    throttled = call(emulator, "/slow", key="b")
    assert (throttled.status, throttled.headers["Retry-After"]) == (429, "2")  # 0.5 tokens a second


# ---------------------------------------------------------------------- API keys and the usage plan
def test_each_usage_key_has_its_own_bucket(
    emulator: RestApiEmulator, functions: dict[str, FakeFunction], clock: Clock
) -> None:
    assert [call(emulator, "/things", key="a").status for _ in range(2)] == [200, 200]
    throttled = call(emulator, "/things", key="a")
    assert throttled.status == 429
    assert json.loads(throttled.body)["error"]["code"] == "rate_limited"
    assert throttled.headers["Retry-After"] == "1"
    assert len(functions["AppFunction"].events) == 2
    assert call(emulator, "/things", key="b").status == 200  # another tenant is not held back
    assert call(emulator, "/other", key="a").status == 429  # the plan covers every method
    clock.now += 1.0
    assert call(emulator, "/things", key="a").status == 200


def test_a_method_that_requires_a_key_refuses_an_authorizer_answer_without_one(
    emulator: RestApiEmulator, functions: dict[str, FakeFunction]
) -> None:
    response = call(emulator, "/things", key=None)
    assert response.status == 403
    assert response.headers["x-amzn-ErrorType"] == "INVALID_API_KEY"
    error = json.loads(response.body)["error"]  # the template's DEFAULT_4XX, as on API Gateway
    assert (error["code"], error["message"]) == ("invalid_request", "Forbidden")
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert functions["AppFunction"].events == []


def test_a_public_method_needs_no_key(emulator: RestApiEmulator, functions: dict[str, FakeFunction]) -> None:
    assert call(emulator, "/health", key=None).status == 200
    assert functions["AuthFunction"].events == []


def test_the_preflight_carries_no_key_so_sams_default_refuses_it(
    tmp_path: Path, functions: dict[str, FakeFunction], clock: Clock
) -> None:
    headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    strict = emulator_for(tmp_path, functions, clock)
    assert strict.handle("OPTIONS", "/things", headers, b"").status == 403
    relaxed_text = TEMPLATE.replace(
        "        ApiKeyRequired: true\n",
        "        ApiKeyRequired: true\n        AddApiKeyRequiredToCorsPreflight: false\n",
    )
    relaxed = emulator_for(tmp_path, functions, clock, relaxed_text)
    assert relaxed.handle("OPTIONS", "/things", headers, b"").status == 200


def test_with_the_header_source_the_key_is_x_api_key(tmp_path: Path, clock: Clock) -> None:
    text = TEMPLATE.replace("ApiKeySourceType: AUTHORIZER", "ApiKeySourceType: HEADER")
    functions = {"AuthFunction": FakeFunction(tenant_authorizer), "AppFunction": FakeFunction(ok)}
    emulator = emulator_for(tmp_path, functions, clock, text)
    assert emulator.handle("GET", "/things", {"x-test-key": "a"}, b"").status == 403
    assert emulator.handle("GET", "/things", {"x-test-key": "a", "X-Api-Key": "k"}, b"").status == 200


# ---------------------------------------------------------------------- the authorizer cache
CACHED = TEMPLATE.replace(
    "            Identity:\n              ReauthorizeEvery: 0\n",
    "            Identity:\n              Headers: [Authorization]\n              QueryStrings: [v]\n"
    "              ReauthorizeEvery: 300\n",
)


def by_token(event: dict[str, Any]) -> dict[str, Any]:
    """Allows exactly the requested method for 'Bearer good' ('Bearer bad' is denied)."""
    token = (event["headers"] or {}).get("Authorization")
    return {
        "principalId": "p",
        "policyDocument": {
            "Statement": [
                {
                    "Action": "execute-api:Invoke",
                    "Effect": "Allow" if token == "Bearer good" else "Deny",
                    "Resource": event["methodArn"],
                }
            ]
        },
        "usageIdentifierKey": "usage",
    }


@pytest.fixture
def cached(tmp_path: Path, clock: Clock) -> tuple[RestApiEmulator, FakeFunction]:
    authorizer = FakeFunction(by_token)
    functions = {"AuthFunction": authorizer, "AppFunction": FakeFunction(ok)}
    return emulator_for(tmp_path, functions, clock, CACHED), authorizer


def test_the_authorizers_answer_is_cached_per_identity_for_its_ttl(
    cached: tuple[RestApiEmulator, FakeFunction], clock: Clock
) -> None:
    emulator, authorizer = cached
    good = {"Authorization": "Bearer good"}
    assert emulator.handle("GET", "/things?v=1", good, b"").status == 200
    clock.now += 2  # past the usage plan's refill
    assert emulator.handle("GET", "/things?v=1", good, b"").status == 200
    assert len(authorizer.events) == 1
    assert emulator.handle("GET", "/things?v=2", good, b"").status == 200  # other values, other entry
    assert len(authorizer.events) == 2
    assert emulator.handle("GET", "/things?v=1", {"Authorization": "Bearer bad"}, b"").status == 403
    assert emulator.handle("GET", "/things?v=1", {"Authorization": "Bearer bad"}, b"").status == 403
    assert len(authorizer.events) == 3  # a deny is cached too
    clock.now += 301
    assert emulator.handle("GET", "/things?v=1", good, b"").status == 200
    assert len(authorizer.events) == 4


def test_a_cached_policy_is_checked_against_each_method(cached: tuple[RestApiEmulator, FakeFunction]) -> None:
    emulator, authorizer = cached
    good = {"Authorization": "Bearer good"}
    assert emulator.handle("GET", "/things?v=1", good, b"").status == 200
    # The cached policy allows GET /things only: API Gateway denies another method from the cache.
    assert emulator.handle("GET", "/other?v=1", good, b"").status == 403
    assert len(authorizer.events) == 1


def test_a_missing_identity_source_is_401_without_the_authorizer(
    cached: tuple[RestApiEmulator, FakeFunction],
) -> None:
    emulator, authorizer = cached
    assert emulator.handle("GET", "/things", {"Authorization": "Bearer good"}, b"").status == 401
    assert emulator.handle("GET", "/things?v=1", {}, b"").status == 401
    assert emulator.handle("GET", "/things?v=", {"Authorization": "Bearer good"}, b"").status == 401
    assert authorizer.events == []


def test_without_a_ttl_every_request_is_authorized(
    emulator: RestApiEmulator, functions: dict[str, FakeFunction], clock: Clock
) -> None:
    for key in ("a", "a", "b"):
        assert call(emulator, "/things", key=key).status == 200
    assert len(functions["AuthFunction"].events) == 3


def test_cache_entries_expire_on_the_clock(clock: Clock) -> None:
    cache = AuthorizerCache(10, clock)
    cache.put(("a",), {"policyDocument": {}})
    clock.now += 9.9
    assert cache.get(("a",)) == {"policyDocument": {}}
    clock.now += 0.1
    assert cache.get(("a",)) is None
