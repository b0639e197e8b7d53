"""The HTTP edge every function shares: envelopes, status mapping, 404/405, validation, request id."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import pytest
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import BaseModel, Field

from spool_core.api.errors import register_status, status_for
from spool_core.api.resolver import api_handler, create_resolver, refuse_body, tenant_of
from spool_core.errors import InvalidRequest, NotFound, SpoolError
from tests.support import api_event, response_json


class Widget(BaseModel):
    name: str = Field(min_length=1)
    size: int = Field(ge=1)


class Teapot(SpoolError):
    code = "teapot"


register_status(Teapot, 418)


class FakeContext:
    function_name = "test"
    memory_limit_in_mb = 128
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    aws_request_id = "req-1"


def build() -> Any:
    app = create_resolver()

    @app.post("/v1/widgets")
    def create(widget: Widget) -> dict[str, Any]:
        return {"name": widget.name, "tenant": tenant_of(app).id}

    @app.post("/v1/widgets/<widget_id>/polish")
    def polish(widget_id: str) -> dict[str, Any]:
        refuse_body(app)
        return {"polished": widget_id}

    @app.get("/v1/gadgets")
    def listing(limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        return {"limit": limit}

    @app.get("/v1/widgets/<widget_id>")
    def get(widget_id: str) -> dict[str, Any]:
        if widget_id == "teapot":
            raise Teapot("I am a teapot", details={"widget_id": widget_id}, suggestions=["Use a kettle"])
        if widget_id == "boom":
            raise RuntimeError("secret internals")
        raise NotFound(f"widget {widget_id} not found")

    return api_handler(app)


@pytest.fixture
def handler() -> Any:
    return build()


def call(handler: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    event = api_event(*args, **kwargs)
    response = handler(event, FakeContext())
    headers = {**(response.get("headers") or {})}
    headers.update({k: ", ".join(v) for k, v in (response.get("multiValueHeaders") or {}).items()})
    assert headers["X-Request-Id"] == event["requestContext"]["requestId"]
    return response["statusCode"], headers, response_json(response)


def assert_envelope(body: Any, code: str) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert set(error) == {"code", "message", "details", "suggestions", "request_id"}
    assert error["request_id"]
    assert error["message"]
    return error


def test_success_carries_the_request_id_and_the_tenant(handler: Any) -> None:
    status, _, body = call(handler, "POST", "/v1/widgets", body={"name": "a", "size": 1}, tenant="acme")
    assert status == 200
    assert body == {"name": "a", "tenant": "acme"}


def test_malformed_json_is_400_invalid_request(handler: Any) -> None:
    status, _, body = call(handler, "POST", "/v1/widgets", body="{not json")
    assert status == 400
    error = assert_envelope(body, "invalid_request")
    assert "not valid JSON" in error["message"]
    assert error["suggestions"]


def test_schema_violations_name_every_offending_field(handler: Any) -> None:
    status, _, body = call(handler, "POST", "/v1/widgets", body={"name": "", "size": 0})
    assert status == 400
    error = assert_envelope(body, "invalid_request")
    fields = {f["field"] for f in error["details"]["fields"]}
    assert fields == {"body.name", "body.size"}
    assert any("body field 'name'" in s for s in error["suggestions"])
    assert any("body field 'size'" in s for s in error["suggestions"])


def test_a_bad_query_parameter_is_named_as_one_in_the_suggestions(handler: Any) -> None:
    status, _, body = call(handler, "GET", "/v1/gadgets", query={"limit": "x"})
    assert status == 400
    error = assert_envelope(body, "invalid_request")
    assert [f["field"] for f in error["details"]["fields"]] == ["query.limit"]
    assert error["suggestions"][0].startswith("Fix the query parameter 'limit': ")
    assert "body" not in error["suggestions"][0]
    assert any("/v1/openapi.json" in s for s in error["suggestions"])


def test_unknown_route_is_404_not_found(handler: Any) -> None:
    status, _, body = call(handler, "GET", "/v1/nothing")
    assert status == 404
    assert_envelope(body, "not_found")


def test_known_route_with_another_method_is_405_with_allow(handler: Any) -> None:
    status, headers, body = call(handler, "DELETE", "/v1/widgets")
    assert status == 405
    error = assert_envelope(body, "method_not_allowed")
    assert error["details"]["allowed"] == ["POST"]
    assert headers["Allow"] == "POST"


def test_domain_errors_map_through_the_one_table(handler: Any) -> None:
    status, _, body = call(handler, "GET", "/v1/widgets/teapot", resource="/v1/widgets/{widget_id}")
    assert status == 418
    error = assert_envelope(body, "teapot")
    assert error["details"] == {"widget_id": "teapot"}
    assert error["suggestions"] == ["Use a kettle"]
    status, _, body = call(handler, "GET", "/v1/widgets/x")
    assert status == 404
    assert_envelope(body, "not_found")


def test_uncaught_exceptions_are_500_without_internals(
    handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    status, _, body = call(handler, "GET", "/v1/widgets/boom")
    assert status == 500
    error = assert_envelope(body, "internal_error")
    assert error["message"] == "Internal error while handling the request"
    assert "secret" not in str(body)
    assert "Traceback" not in str(body)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert str(record.exc_info[1]) == "secret internals"  # the log has what the client does not
    assert record.request_id == body["error"]["request_id"]  # type: ignore[attr-defined]


def test_missing_tenant_is_401_not_a_crash(handler: Any) -> None:
    status, _, body = call(handler, "POST", "/v1/widgets", body={"name": "a", "size": 1}, tenant=None)
    assert status == 401
    assert_envelope(body, "unauthorized")


def test_status_lookup_follows_the_class_hierarchy() -> None:
    class Special(InvalidRequest):
        code = "special"

    assert status_for(Special("x")) == 400
    assert status_for(SpoolError("x")) == 500


class Keys:
    """``ApiKeys.check`` as a stream's key check sees it: the record, None (revoked), or a failure."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def check(self, key_hash: str) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_streams_key_check_asks_for_the_key_the_authorizer_checked_and_survives_a_failed_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from spool_core.api.web import Caller
    from spool_core.tenancy import Tenant

    caller = Caller(Tenant("acme"), "*", "r-1", key_hash="h" * 64)
    assert caller.access(Keys(object()))() is True  # active
    assert caller.access(Keys(None))() is False  # revoked or expired: the stream ends
    with caplog.at_level(logging.WARNING):
        # the key table throttled or unreachable: the stream goes on, and is asked again later
        assert caller.access(Keys(ConnectionError("unreachable")))() is True
    assert "stream key check failed" in caplog.text
    assert Caller(Tenant("acme"), "events:job_1", "r-2").access(Keys(None)) is None  # a token


@pytest.mark.parametrize("body", [None, "", "  ", "{}", "null"])
def test_an_operation_without_a_body_takes_none_or_an_empty_object(handler: Any, body: Any) -> None:
    status, _, answer = call(handler, "POST", "/v1/widgets/w1/polish", body=body)
    assert (status, answer) == (200, {"polished": "w1"})


@pytest.mark.parametrize(
    ("body", "fields"),
    [("{bad", ["body"]), ('{"bogus": 1, "force": true}', ["body.bogus", "body.force"]), ("[1]", ["body"])],
)
def test_an_operation_without_a_body_refuses_one_naming_what_was_sent(
    handler: Any, body: str, fields: list[str]
) -> None:
    """A cancel or an upload's creation answered 201 or 200 to `{bad` and to fields it does not take."""
    status, _, answer = call(handler, "POST", "/v1/widgets/w1/polish", body=body)
    assert status == 400
    error = assert_envelope(answer, "invalid_request")
    assert [f["field"] for f in error["details"]["fields"]] == fields


def test_a_body_of_many_unknown_fields_is_refused_in_a_bounded_answer(handler: Any) -> None:
    """300,000 unknown keys answered a 31 MB 400 (over Lambda's 6 MB response: a 502 on AWS)."""
    body = json.dumps({"x" * 100_000: 1} | {f"k{i}": 1 for i in range(5000)})  # a long name first
    status, _, answer = call(handler, "POST", "/v1/widgets/w1/polish", body=body)
    assert status == 400
    error = assert_envelope(answer, "invalid_request")
    assert len(error["details"]["fields"]) == 20 and error["details"]["more_fields"] == 4981
    assert error["message"].endswith("and 4,981 more")
    assert len(json.dumps(answer)) < 10_000
