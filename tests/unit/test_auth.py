from __future__ import annotations

import pytest

from spool_core.auth import ApiKeys, KeyCache, extract_api_key, hash_api_key
from spool_core.tenancy import Tenant
from tests.fakes import MemoryApiKeyStore


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer   sk-2 "}, "sk-2"),
        ({"X-Api-Key": "sk-3"}, "sk-3"),
        ({"Authorization": "Basic abc", "x-api-key": "sk-4"}, "sk-4"),
        ({"Authorization": "Bearer "}, None),
        ({}, None),
        (None, None),
    ],
)
def test_extract_api_key(headers: dict[str, str] | None, expected: str | None) -> None:
    assert extract_api_key(headers) == expected


def test_keys_are_stored_hashed_and_resolve_to_their_tenant() -> None:
    store = MemoryApiKeyStore()
    keys = ApiKeys(store, cache=KeyCache(0))
    key, record = keys.create(Tenant("acme"), "ci")
    assert key.startswith("sk-") and len(key) > 40
    assert key not in str(store.items)  # only the hash is kept
    assert record.key_hash == hash_api_key(key)
    found = keys.authenticate(key)
    assert found is not None and found.tenant == Tenant("acme")
    assert keys.authenticate("sk-wrong") is None
    assert keys.authenticate(None) is None


def test_disabled_keys_are_refused() -> None:
    store = MemoryApiKeyStore()
    keys = ApiKeys(store, cache=KeyCache(0))
    record = keys.register("sk-x", Tenant("acme"))
    store.put(record.model_copy(update={"disabled": True}))
    assert keys.authenticate("sk-x") is None
