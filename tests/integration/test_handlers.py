"""Every function in the template, invoked with its sample event from events/ against moto."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool.devstack.runtime import HandlerError
from spool.devstack.template import Template
from spool_core.auth import usage_key
from tests.integration.conftest import DEV_KEY, DEV_TENANT, client, drain_dead_letters
from tests.support import api_event, load_event, response_json


def test_every_function_in_the_template_has_a_sample_event(template: Template) -> None:
    samples = {
        "AuthorizerFunction": "authorizer",
        "HealthFunction": "health",
        "ContextsFunction": "contexts",
        "JobsFunction": "jobs",
        "DeadLetterFunction": "dead_letter",
        "UsageFunction": "usage",
        "ModelsFunction": "models",
        "WebSocketFunction": "websocket",
        "FanoutFunction": "fanout",
        "WorkerFunction": "worker",
        "SweeperFunction": "sweeper",
        "StreamFunction": "stream",
        "EventsFunction": "stream",
        "ChunksFunction": "chunks",
    }
    assert set(template.functions()) <= set(samples), "add a sample event for the new function"
    for name in template.functions():
        assert load_event(samples[name])


def test_authorizer_allows_a_known_key_and_names_its_tenant(invoke: Any) -> None:
    event = load_event("authorizer")
    event["headers"]["Authorization"] = f"Bearer {DEV_KEY}"
    policy = invoke("AuthorizerFunction", event)
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    assert policy["context"]["tenant_id"] == DEV_TENANT
    assert policy["usageIdentifierKey"] == usage_key(DEV_TENANT)  # the usage plan meters the tenant


@pytest.mark.parametrize("header", [None, "Bearer sk-unknown"])
def test_authorizer_refuses_missing_and_unknown_keys(invoke: Any, header: str | None) -> None:
    event = load_event("authorizer")
    if header is None:
        del event["headers"]["Authorization"]
    else:
        event["headers"]["Authorization"] = header
    with pytest.raises(HandlerError) as caught:  # API Gateway's signal for its UNAUTHORIZED response
        invoke("AuthorizerFunction", event)
    assert caught.value.payload["errorMessage"] == "Unauthorized"


def test_health_reports_each_dependency_with_latency(invoke: Any, stack: StackDescription) -> None:
    drain_dead_letters(stack)
    response = invoke("HealthFunction", load_event("health"))
    assert response["statusCode"] == 200
    body = response_json(response)
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"dynamodb", "s3", "queue", "dead_letters", "provider:simulated"}
    assert body["checks"]["provider:simulated"]["models"]["sim-fast"]["circuit"] in {"closed", "half_open"}
    assert all(check["latency_ms"] >= 0 for check in body["checks"].values())
    assert body["checks"]["queue"]["dead_letter_depth"] == 0


def test_a_dead_letter_makes_health_degraded_even_while_it_is_being_handled(
    invoke: Any, stack: StackDescription
) -> None:
    sqs, dead = client("sqs", stack), stack.refs["JobsDeadLetterQueue"]
    drain_dead_letters(stack)
    sqs.send_message(QueueUrl=dead, MessageBody='{"job_id": "job_x", "tenant_id": "t"}')
    (held,) = sqs.receive_message(QueueUrl=dead, VisibilityTimeout=60)["Messages"]  # in flight: being handled
    body = response_json(invoke("HealthFunction", load_event("health")))
    assert body["status"] == "degraded"
    assert body["checks"]["dead_letters"] == {**body["checks"]["dead_letters"], "status": "down", "depth": 1}
    assert body["checks"]["queue"]["dead_letter_depth"] == 1
    sqs.delete_message(QueueUrl=dead, ReceiptHandle=held["ReceiptHandle"])


def test_health_is_503_down_when_a_dependency_is_missing(invoke: Any) -> None:
    response = invoke("HealthFunction", load_event("health"), environment={"SPOOL_BUCKET": "no-such-bucket"})
    assert response["statusCode"] == 503
    body = response_json(response)
    assert body["status"] == "down"
    assert body["checks"]["s3"]["status"] == "down"
    assert body["error"]["code"] == "service_unavailable"
    assert body["error"]["details"]["failing"] == ["s3"]


def test_health_answers_unknown_paths_with_the_404_envelope(invoke: Any) -> None:
    event = load_event("health")
    event["path"] = event["requestContext"]["resourcePath"] = "/v2/nothing"
    event["resource"] = "/{proxy+}"
    response = invoke("HealthFunction", event)
    assert response["statusCode"] == 404
    assert response_json(response)["error"]["code"] == "not_found"


def test_contexts_function_answers_its_sample_event(invoke: Any) -> None:
    response = invoke("ContextsFunction", load_event("contexts"))
    assert response["statusCode"] in {200, 404}
    assert "error" in response_json(response) or "context_id" in response_json(response)


def test_token_counts_know_only_the_models_the_tenant_may_use(invoke: Any) -> None:
    """``sim-preview`` is rolled out by a flag to a few tenants: the local tenant is not one of them, so
    counting for it answers as creating a job with it does (``model_not_found``, not listed)."""

    def count(model: str) -> tuple[int, dict[str, Any]]:
        event = load_event("contexts")
        event.update(
            resource="/v1/tokens/count",
            path="/v1/tokens/count",
            httpMethod="POST",
            pathParameters=None,
            body=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        event["requestContext"]["httpMethod"] = "POST"
        event["requestContext"]["resourcePath"] = "/v1/tokens/count"
        response = invoke("ContextsFunction", event)
        return response["statusCode"], response_json(response)

    status, counted = count("sim-fast")
    assert status == 200 and counted["input_tokens"] > 0
    status, refused = count("sim-preview")
    assert (status, refused["error"]["code"]) == (400, "model_not_found")
    assert "sim-preview" not in refused["error"]["details"]["available"]


def test_answers_that_name_one_of_several_origins_vary_by_origin(invoke: Any) -> None:
    """With a list of allowed origins an answer names the request's (or none): shared caches must key
    it by ``Origin``. With ``*`` every answer is the same, and says nothing."""
    origins = {"SPOOL_CORS_ORIGINS": "https://a.example,https://b.example"}

    def answer(origin: str | None, environment: dict[str, str] | None) -> dict[str, str]:
        event = load_event("contexts")
        if origin:
            event["headers"]["Origin"] = origin
            event["multiValueHeaders"]["Origin"] = [origin]
        response = invoke("ContextsFunction", event, environment)
        headers = {
            **response.get("headers", {}),
            **{k: v[0] for k, v in response.get("multiValueHeaders", {}).items()},
        }
        return {k.lower(): v for k, v in headers.items()}

    named = answer("https://b.example", origins)
    assert named["access-control-allow-origin"] == "https://b.example"
    assert named["vary"] == "Origin" and named["x-request-id"]
    assert answer(None, origins)["vary"] == "Origin"  # cached without an origin, it must not serve one
    assert "vary" not in answer("https://b.example", None)


def test_jobs_function_creates_a_job_from_its_sample_event(invoke: Any) -> None:
    response = invoke("JobsFunction", load_event("jobs"))
    assert response["statusCode"] in {202, 409}  # 409 when the sample key was used before in this session
    body = response_json(response)
    job_id = body["job_id"] if response["statusCode"] == 202 else body["error"]["details"]["job_id"]
    assert job_id.startswith("job_")


@pytest.mark.parametrize(
    ("field", "sent", "meant"),
    [
        ("max_tokens", True, 1),  # was a job of 1 token
        ("max_tokens", "200", 200),
        ("fallback", "no", False),  # was fallback off
        ("fallback", 0, False),
        ("temperature", "0.5", 0.5),
    ],
)
def test_a_job_body_is_json_as_written_never_coerced(invoke: Any, field: str, sent: Any, meant: Any) -> None:
    """A number is a JSON number and a boolean a JSON boolean (spool_core.json_values): pydantic's lax
    mode had read ``true`` as 1 and ``"no"`` as false."""
    body = {"message": "hi", "model": "sim-fast", "max_tokens": 20}
    key = {"Idempotency-Key": f"json-{field}-{json.dumps(sent)}"}
    response = invoke("JobsFunction", api_event("POST", "/v1/jobs", body={**body, field: sent}, headers=key))
    assert response["statusCode"] == 400, response
    error = response_json(response)["error"]
    assert error["code"] == "invalid_request"
    assert [f["field"] for f in error["details"]["fields"]] == [f"body.{field}"], error
    # Nothing was stored for the refused body: the same key then creates the job meant.
    created = invoke("JobsFunction", api_event("POST", "/v1/jobs", body={**body, field: meant}, headers=key))
    assert created["statusCode"] == 202, created


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_temperature_that_is_no_number_is_called_that(invoke: Any, value: float) -> None:
    """``NaN`` and ``Infinity`` (which Python's json writes) were refused as over 2."""
    body = {"message": "hi", "model": "sim-fast", "max_tokens": 20, "temperature": value}
    key = {"Idempotency-Key": f"temperature-{value}"}
    response = invoke("JobsFunction", api_event("POST", "/v1/jobs", body=body, headers=key))
    assert response["statusCode"] == 400, response
    (field,) = response_json(response)["error"]["details"]["fields"]
    assert field["field"] == "body.temperature" and "finite number" in field["message"]


def test_a_whole_number_is_a_number_however_json_writes_it(invoke: Any) -> None:
    """``200.0`` is what Python's json.dumps writes for a float holding 200 (``total_seconds()``):
    JSON has one number type, so it is 200, as a context's ``ttl_seconds`` always read it."""
    body = {"message": "hi", "model": "sim-fast", "max_tokens": 20.0, "temperature": 1}
    response = invoke(
        "JobsFunction", api_event("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": "whole"})
    )
    assert response["statusCode"] in {202, 409}, response
    half = invoke(
        "JobsFunction",
        api_event("POST", "/v1/jobs", body={**body, "max_tokens": 20.5}, headers={"Idempotency-Key": "half"}),
    )
    assert half["statusCode"] == 400, half


def test_usage_function_answers_its_sample_event(invoke: Any) -> None:
    response = invoke("UsageFunction", load_event("usage"))
    assert response["statusCode"] == 200
    body = response_json(response)
    assert (body["since"], body["until"]) == ("2026-11-20", "2026-11-26")
    assert body["limits"]["tokens_per_minute"]["limit"] > 0
    headers = {
        **response.get("headers", {}),
        **{k: v[0] for k, v in response.get("multiValueHeaders", {}).items()},
    }
    assert "X-RateLimit-Remaining-Tokens" in headers


def test_an_unknown_model_is_an_openai_not_found(invoke: Any) -> None:
    """``GET /v1/models/{id}`` is called by OpenAI's SDKs: its errors carry their ``type`` and
    ``param`` besides Spool's envelope."""
    event = load_event("models")
    event.update(
        resource="/v1/models/{model_id}", path="/v1/models/gpt-nope", pathParameters={"model_id": "gpt-nope"}
    )
    event["requestContext"].update(resourcePath="/v1/models/{model_id}", path="/v1/models/gpt-nope")
    response = invoke("ModelsFunction", event)
    error = response_json(response)["error"]
    assert response["statusCode"] == 404
    assert (error["code"], error["type"], error["param"]) == ("model_not_found", "not_found_error", None)
    assert error["suggestions"] and error["request_id"]


def test_models_function_lists_what_the_tenant_may_use(invoke: Any) -> None:
    response = invoke("ModelsFunction", load_event("models"))
    assert response["statusCode"] == 200
    body = response_json(response)
    assert body["object"] == "list"  # an OpenAI model list
    models = {m["id"]: m for m in body["data"]}
    assert {"sim-fast", "sim-realtime"} <= set(models)
    assert "gpt-4o-2024-08-06" not in models  # shipped disabled until configured
    realtime = models["sim-realtime"]
    assert set(realtime) == {
        "id",
        "object",
        "created",
        "owned_by",
        "aliases",
        "provider",
        "context_window",
        "max_output_tokens",
        "pricing",
        "fallbacks",
        "status",
    }
    assert (realtime["object"], realtime["owned_by"]) == ("model", "simulated")
    assert isinstance(realtime["created"], int) and realtime["created"] > 0
    assert realtime["fallbacks"] == ["sim-fast"]
    assert realtime["context_window"] == 128_000
    assert set(realtime["pricing"]) == {"input_per_mtok", "output_per_mtok"}


def test_websocket_function_accepts_a_known_key_and_refuses_others(invoke: Any) -> None:
    event = load_event("websocket")
    event["queryStringParameters"] = {"api_key": DEV_KEY}
    request_id = {"X-Request-Id": event["requestContext"]["requestId"]}  # on the handshake's answer
    assert invoke("WebSocketFunction", event) == {"statusCode": 200, "headers": request_id}
    event["queryStringParameters"] = {"api_key": "sk-nope"}
    refused = invoke("WebSocketFunction", event)
    assert refused["statusCode"] == 401 and refused["headers"] == request_id
    assert json.loads(refused["body"])["error"]["code"] == "unauthorized"
    disconnect = load_event("websocket")
    disconnect["requestContext"]["routeKey"] = "$disconnect"
    assert invoke("WebSocketFunction", disconnect) == {"statusCode": 200}


def test_fanout_function_takes_a_stream_batch_for_a_job_without_subscribers(invoke: Any) -> None:
    assert invoke("FanoutFunction", load_event("fanout")) == {"batchItemFailures": []}


def test_dead_letter_function_drops_messages_of_unknown_jobs(invoke: Any) -> None:
    assert invoke("DeadLetterFunction", load_event("dead_letter")) == {"batchItemFailures": []}


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        json.dumps({"job_id": "job_x"}),
        json.dumps({"job_id": "job_x", "tenant_id": "not a valid tenant!"}),  # D5: dropped, not retried
        json.dumps({"job_id": "job_x", "tenant_id": "t", "extra": 1}),
    ],
)
def test_dead_letters_that_can_never_succeed_are_dropped(invoke: Any, body: str) -> None:
    event = load_event("dead_letter")
    event["Records"][0]["body"] = body
    assert invoke("DeadLetterFunction", event) == {"batchItemFailures": []}


def test_the_sweeper_answers_its_scheduled_event(invoke: Any) -> None:
    result = invoke("SweeperFunction", load_event("sweeper"))
    assert isinstance(result["requeued"], list)


def test_worker_reports_unparseable_messages_as_batch_item_failures(
    invoke: Any, stack: StackDescription
) -> None:
    event = load_event("worker")
    good = event["Records"][0]
    bad = {**good, "messageId": "bad-1", "body": json.dumps({"unexpected": True})}
    event["Records"].append(bad)
    result = invoke("WorkerFunction", event)
    assert result == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}
