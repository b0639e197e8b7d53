"""The authorizer handler, in-process with an in-memory key table and injected clocks: the usage key it
names for API keys and events tokens, and a revoked key refused once its cache entry ends."""

from __future__ import annotations

import importlib.util
import time
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from spool_core import bootstrap
from spool_core.auth import ApiKeys, KeyCache, usage_key
from spool_core.events import EventsToken
from spool_core.tenancy import Tenant
from tests.fakes import KeyClock, MemoryApiKeyStore
from tests.support import ROOT, load_event

CONTEXT = SimpleNamespace(
    function_name="authorizer",
    memory_limit_in_mb=256,
    invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:authorizer",
    aws_request_id="req-1",
)


def _load(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch, clock: KeyClock, store: MemoryApiKeyStore) -> ApiKeys:
    """The authorizer's keys: one execution environment's cache (30 s) over an in-memory table."""
    cached = ApiKeys(store, cache=KeyCache(30, clock=lambda: clock.seconds), now=lambda: clock.wall)
    monkeypatch.setattr(bootstrap, "api_keys", lambda config=None: cached)
    monkeypatch.setattr(bootstrap, "events_token", lambda config=None: EventsToken(b"s" * 32))
    return cached


@pytest.fixture(scope="module")
def authorizer() -> ModuleType:
    return _load("authorizer_app", "functions/authorizer/app.py")


def _event(authorization: str | None = None, query: dict[str, str] | None = None) -> dict[str, Any]:
    event = load_event("authorizer")
    event["headers"].pop("Authorization")
    if authorization:
        event["headers"]["Authorization"] = authorization
    if query:
        event["queryStringParameters"] = query
        event["path"] = "/v1/jobs/job_1/events"
        event["methodArn"] = (
            "arn:aws:execute-api:us-east-1:123456789012:a1b2c3d4e5/prod/GET/v1/jobs/job_1/events"
        )
    return event


def test_an_api_key_is_allowed_with_its_tenants_usage_key(authorizer: ModuleType, keys: ApiKeys) -> None:
    key, record = keys.create(Tenant("acme"))
    policy = authorizer.lambda_handler(_event(f"Bearer {key}"), CONTEXT)
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    assert policy["usageIdentifierKey"] == usage_key("acme")
    assert policy["context"] == {
        "tenant_id": "acme",
        "key_id": record.key_id,
        "key_hash": record.key_hash,
        "scope": "*",
    }


def test_an_events_token_is_allowed_with_its_tenants_usage_key(authorizer: ModuleType, keys: ApiKeys) -> None:
    token = EventsToken(b"s" * 32).sign("acme", "job_1", int(time.time()) + 60)
    policy = authorizer.lambda_handler(_event(query={"token": token}), CONTEXT)
    assert policy["usageIdentifierKey"] == usage_key("acme")
    assert policy["context"]["scope"] == "events:job_1"


def test_a_revoked_key_is_refused_once_its_cache_entry_ends(
    authorizer: ModuleType, keys: ApiKeys, clock: KeyClock, store: MemoryApiKeyStore
) -> None:
    key, record = keys.create(Tenant("acme"))
    assert authorizer.lambda_handler(_event(f"Bearer {key}"), CONTEXT)["context"]["tenant_id"] == "acme"
    ApiKeys(store, cache=KeyCache(0), now=lambda: clock.wall).revoke(record.key_id)  # the operator, elsewhere
    assert authorizer.lambda_handler(_event(f"Bearer {key}"), CONTEXT)["context"]["tenant_id"] == "acme"
    clock.advance(30)
    with pytest.raises(Exception, match=r"^Unauthorized$"):  # API Gateway's UNAUTHORIZED (401)
        authorizer.lambda_handler(_event(f"Bearer {key}"), CONTEXT)


def test_an_events_token_works_while_the_key_it_was_handed_to_is_active(
    authorizer: ModuleType, keys: ApiKeys, clock: KeyClock, store: MemoryApiKeyStore
) -> None:
    """A token listed with a key outlived that key's revocation by a month (its own expiry): revoking a
    leaked key must end what it was handed too."""
    _, record = keys.create(Tenant("acme"))
    token = EventsToken(b"s" * 32).sign("acme", "job_1", int(time.time()) + 3600, record.key_id)
    policy = authorizer.lambda_handler(_event(query={"token": token}), CONTEXT)
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    assert policy["context"]["key_hash"] == record.key_hash  # its stream asks about that key as it goes
    ApiKeys(store, cache=KeyCache(0), now=lambda: clock.wall).revoke(record.key_id)
    clock.advance(30)  # the key cache's time
    denied = authorizer.lambda_handler(_event(query={"token": token}), CONTEXT)
    assert denied["policyDocument"]["Statement"][0]["Effect"] == "Deny"
    other = EventsToken(b"s" * 32).sign("other", "job_1", int(time.time()) + 3600, record.key_id)
    assert (
        authorizer.lambda_handler(_event(query={"token": other}), CONTEXT)["policyDocument"]["Statement"][0][
            "Effect"
        ]
        == "Deny"
    )  # the key is looked up within the token's tenant
    legacy = EventsToken(b"s" * 32).sign("acme", "job_1", int(time.time()) + 3600)  # names no key
    assert "key_hash" not in authorizer.lambda_handler(_event(query={"token": legacy}), CONTEXT)["context"]
