"""Revoked keys through the real handlers against moto: the authorizer refuses them, the WebSocket
function and the fanout close the connections they opened (a final error frame, then the management
API's delete); a deep health check needs no key (DESIGN.md), a bad one included. The functions run
with SPOOL_AUTH_CACHE_SECONDS=0, so a revocation shows at the next invocation instead of after the
cache lifetime."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from spool.devstack.provision import StackDescription
from spool.devstack.runtime import HandlerError
from spool.devstack.websocket import ManagementApiServer
from spool_core import bootstrap
from spool_core.adapters import aws
from spool_core.adapters.api_keys import DynamoApiKeyStore
from spool_core.auth import ApiKeys, KeyCache, usage_key
from spool_core.jobs.model import Chunk, JobRequest
from spool_core.tenancy import Tenant
from tests.integration.conftest import DEV_KEY, client
from tests.support import load_event, response_json

NO_CACHE = {"SPOOL_AUTH_CACHE_SECONDS": "0"}


class RecordingGateway:
    """Stands in for the WebSocket API behind the management API server: which connections are open,
    what each was sent, which were closed."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self.closed: list[str] = []

    def post(self, connection_id: str, data: bytes) -> bool:
        if connection_id not in self.open:
            return False
        self.frames.setdefault(connection_id, []).append(json.loads(data))
        return True

    def disconnect(self, connection_id: str) -> bool:
        if connection_id not in self.open:
            return False
        self.open.discard(connection_id)
        self.closed.append(connection_id)
        return True

    def is_connected(self, connection_id: str) -> bool:
        return connection_id in self.open


@pytest.fixture
def gateway() -> Iterator[tuple[RecordingGateway, dict[str, str]]]:
    """The recording gateway and the environment that points the functions' management API at it."""
    recording = RecordingGateway()
    server = ManagementApiServer(recording)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/prod"
    yield recording, {**NO_CACHE, "SPOOL_WEBSOCKET_MANAGEMENT_URL": url}
    server.shutdown()
    server.server_close()


def operator() -> ApiKeys:
    """What `spool keys` does: the key table itself, no cache."""
    config = bootstrap.settings()
    return ApiKeys(DynamoApiKeyStore(aws.dynamodb(config), config.api_keys_table), cache=KeyCache(0))


def ws_event(route: str, connection_id: str, **extra: Any) -> dict[str, Any]:
    event = load_event("websocket")
    event["requestContext"].update(routeKey=route, connectionId=connection_id)
    event["queryStringParameters"] = None
    event.update(extra)
    return event


def connect(
    invoke: Any, gateway: RecordingGateway, env: dict[str, str], connection_id: str, key: str
) -> None:
    event = ws_event("$connect", connection_id, queryStringParameters={"api_key": key})
    request_id = {"X-Request-Id": event["requestContext"]["requestId"]}  # on the handshake's answer
    assert invoke("WebSocketFunction", event, environment=env) == {"statusCode": 200, "headers": request_id}
    gateway.open.add(connection_id)


def subscribe(invoke: Any, env: dict[str, str], connection_id: str, job_id: str) -> None:
    body = json.dumps({"action": "subscribe", "job_id": job_id, "after": 0})
    event = ws_event("subscribe", connection_id, body=body)
    event["requestContext"]["eventType"] = "MESSAGE"
    assert invoke("WebSocketFunction", event, environment=env) == {"statusCode": 200}


def chunk_record(tenant: str, job_id: str, sequence_id: int) -> dict[str, Any]:
    event = load_event("fanout")
    record = event["Records"][0]
    keys = {"pk": {"S": f"{tenant}#job#{job_id}"}, "sequence_id": {"N": str(sequence_id)}}
    record["dynamodb"]["Keys"] = keys
    record["dynamodb"]["NewImage"].update(keys)
    return event


def revoked_frame(frames: list[dict[str, Any]]) -> dict[str, Any]:
    error = frames[-1]
    assert error["type"] == "error"
    assert error["error"]["code"] == "unauthorized"
    assert error["error"]["message"] == "This API key was revoked or has expired"
    assert error["error"]["suggestions"]
    assert error["error"]["request_id"]  # the message's, or the fanout invocation's: a log to look up
    return error


def test_the_authorizer_names_the_tenants_usage_key_and_refuses_a_revoked_key(invoke: Any) -> None:
    key, record = operator().create(Tenant("usage"))
    event = load_event("authorizer")
    event["headers"]["Authorization"] = f"Bearer {key}"
    policy = invoke("AuthorizerFunction", event, environment=NO_CACHE)
    assert policy["usageIdentifierKey"] == usage_key("usage")
    assert policy["context"]["key_id"] == record.key_id
    operator().revoke(record.key_id)
    with pytest.raises(HandlerError) as caught:
        invoke("AuthorizerFunction", event, environment=NO_CACHE)
    assert caught.value.payload["errorMessage"] == "Unauthorized"


def test_the_fanout_closes_the_connection_of_a_revoked_key_and_serves_the_others(
    invoke: Any, stack: StackDescription, gateway: tuple[RecordingGateway, dict[str, str]]
) -> None:
    recording, env = gateway
    tenant = Tenant("revoker")
    revoked_key, revoked = operator().create(tenant, "to revoke")
    kept_key, _ = operator().create(tenant, "kept")
    connect(invoke, recording, env, "conn-revoked", revoked_key)
    connect(invoke, recording, env, "conn-kept", kept_key)
    stored = client("dynamodb", stack).get_item(
        TableName=stack.refs["ConnectionsTable"],
        Key={"pk": {"S": "conn#conn-revoked"}, "sk": {"S": "connection"}},
    )["Item"]
    assert stored["key_id"] == {"S": revoked.key_id}  # the connection records its key

    job = (
        bootstrap.job_service(tenant)
        .create(
            "revocation", JobRequest.model_validate({"message": "x", "model": "sim-fast", "max_tokens": 10})
        )
        .job
    )
    _, chunks = bootstrap._job_tables(tenant, bootstrap.settings())
    chunks.append(job.job_id, Chunk(sequence_id=1, text="one", created_at="t", tokens=1, tokens_total=1))
    for connection in ("conn-revoked", "conn-kept"):
        subscribe(invoke, env, connection, job.job_id)
        assert [f["sequence_id"] for f in recording.frames[connection]] == [1]  # the backlog

    operator().revoke(revoked.key_id)
    chunks.append(job.job_id, Chunk(sequence_id=2, text="two", created_at="t", tokens=1, tokens_total=2))
    result = invoke("FanoutFunction", chunk_record("revoker", job.job_id, 2), environment=env)
    assert result == {"batchItemFailures": []}

    revoked_frames = recording.frames["conn-revoked"]
    assert [f.get("sequence_id") for f in revoked_frames] == [1, None]  # no chunk 2: the error instead
    # the job it was being sent and the last chunk sent of it, as the SSE stream's error names them
    assert revoked_frame(revoked_frames)["error"]["details"] == {"job_id": job.job_id, "last_sequence_id": 1}
    assert recording.closed == ["conn-revoked"]
    assert [f["sequence_id"] for f in recording.frames["conn-kept"]] == [1, 2]
    subscriptions = client("dynamodb", stack).get_item(
        TableName=stack.refs["ConnectionsTable"],
        Key={"pk": {"S": f"revoker#job#{job.job_id}"}, "sk": {"S": "sub#conn-revoked"}},
    )
    assert "Item" not in subscriptions  # the closed connection's subscription is gone


def test_subscribing_on_a_connection_whose_key_was_revoked_closes_it(
    invoke: Any, gateway: tuple[RecordingGateway, dict[str, str]]
) -> None:
    recording, env = gateway
    key, record = operator().create(Tenant("late"))
    connect(invoke, recording, env, "conn-late", key)
    operator().revoke(record.key_id)
    subscribe(invoke, env, "conn-late", "job_anything")
    error = revoked_frame(recording.frames["conn-late"])
    assert error["error"]["request_id"] == load_event("websocket")["requestContext"]["requestId"]
    assert error["error"]["details"] == {"job_id": "job_anything", "last_sequence_id": 0}
    assert recording.closed == ["conn-late"]


@pytest.mark.parametrize(
    ("body", "message", "field"),
    [
        ("hello", "The message is not valid JSON", "body"),
        ('{"action": "subscribe"', "The message is not valid JSON", "body"),
        ("[1, 2]", "The message must be a JSON object", "action"),
        ("1" * 5000, "The message is not JSON Spool can read", "body"),  # past Python's digit limit
        ("[" * 100_000, "The message is not JSON Spool can read", "body"),  # past its nesting depth
        ('{"job_id": "job_x"}', "The message must be a JSON object with an 'action'", "action"),
        ('{"action": "dance"}', 'Unknown action "dance"', "action"),
        (json.dumps({"action": "x" * 65}), "Unknown action", "action"),  # not echoed back
    ],
)
def test_a_message_no_route_takes_is_told_what_is_wrong_with_it(
    invoke: Any, gateway: tuple[RecordingGateway, dict[str, str]], body: str, message: str, field: str
) -> None:
    recording, env = gateway
    key, _ = operator().create(Tenant("talker"))
    connect(invoke, recording, env, "conn-talker", key)
    event = ws_event("$default", "conn-talker", body=body)
    event["requestContext"]["eventType"] = "MESSAGE"
    assert invoke("WebSocketFunction", event, environment=env) == {"statusCode": 200}
    ((frame,),) = [recording.frames["conn-talker"]]
    assert frame["type"] == "error"
    error = frame["error"]
    assert (error["code"], error["message"]) == ("invalid_request", message)
    assert error["details"]["fields"][0]["field"] == field and error["details"]["fields"][0]["message"]
    assert error["suggestions"] and error["request_id"] == event["requestContext"]["requestId"]
    assert "conn-talker" in recording.open  # told, not closed


def _deep_health(headers: dict[str, str] | None = None, deep: str = "true") -> dict[str, Any]:
    event = load_event("health")
    event["queryStringParameters"] = {"deep": deep}
    event["multiValueQueryStringParameters"] = {"deep": [deep]}
    event["headers"].update(headers or {})
    return event


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer sk-unknown"}])
def test_deep_health_needs_no_key_and_its_call_is_shared(invoke: Any, headers: dict[str, str] | None) -> None:
    """The public check goes deep for anyone; what protects the provider's bill is the cache every
    caller shares: a second deep check within its lifetime makes no call."""
    cached = {"SPOOL_DEEP_HEALTH_CACHE_SECONDS": "3600"}
    first = invoke("HealthFunction", _deep_health(headers), environment=cached)
    assert first["statusCode"] == 200
    assert response_json(first)["checks"]["provider:simulated"]["deep"]["status"] == "ok"
    again = invoke("HealthFunction", _deep_health(headers), environment=cached)
    assert response_json(again)["checks"]["provider:simulated"]["deep"]["cached"] is True


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
def test_deep_health_with_a_key_calls_the_providers(invoke: Any, header: str) -> None:
    value = f"Bearer {DEV_KEY}" if header == "Authorization" else DEV_KEY
    # Not cached (0 s): test_models_and_fallback expects the session's first deep call to be fresh.
    no_reuse = {"SPOOL_DEEP_HEALTH_CACHE_SECONDS": "0"}
    response = invoke("HealthFunction", _deep_health({header: value}), environment=no_reuse)
    assert response["statusCode"] == 200
    assert response_json(response)["checks"]["provider:simulated"]["deep"]["status"] == "ok"


def test_a_deep_flag_that_is_neither_true_nor_false_is_refused(invoke: Any) -> None:
    """``deep=banana`` was a shallow check that looked like an answer to the deep one; it is refused as
    every route refuses such a flag (``stream=banana`` on a response, ``output=banana`` on a job)."""
    response = invoke("HealthFunction", _deep_health(deep="banana"))
    assert response["statusCode"] == 400
    error = response_json(response)["error"]
    assert error["code"] == "invalid_request"
    assert error["details"]["fields"][0]["field"] == "query.deep"


def test_basic_health_still_needs_no_key(invoke: Any) -> None:
    assert invoke("HealthFunction", load_event("health"))["statusCode"] in {200, 503}
