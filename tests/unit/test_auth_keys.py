"""API keys as operators manage them (list, revoke, rotate), the per-environment key cache, the usage
key the authorizer names, and WebSocket connections closed when their key is revoked. Clocks are
injected: nothing here waits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from spool_core.auth import (
    REVOKED_MESSAGE,
    ApiKeyNotFound,
    ApiKeyRecord,
    ApiKeyRevoked,
    ApiKeys,
    ConnectionGuard,
    ConnectionIdentity,
    KeyCache,
    cache_seconds_from_env,
    hash_api_key,
    usage_key,
)
from spool_core.errors import ConfigurationError, SpoolError
from spool_core.jobs.model import Chunk
from spool_core.subscriptions import Fanout, Subscription
from spool_core.tenancy import Tenant
from tests.fakes import KeyClock, MemoryApiKeyStore
from tests.subscription_fakes import MemorySubscriptionStore

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


def api_keys(store: MemoryApiKeyStore, clock: KeyClock, seconds: float = 30) -> ApiKeys:
    return ApiKeys(store, cache=KeyCache(seconds, clock=clock.monotonic), now=clock.now)


# ---------------------------------------------------------------- the cache


def test_a_known_key_is_read_once_per_cache_lifetime(store: MemoryApiKeyStore, clock: KeyClock) -> None:
    keys = api_keys(store, clock)
    key, _ = keys.create(ACME)
    for _ in range(5):
        assert keys.authenticate(key) is not None
    assert store.gets == 1
    clock.advance(30)
    assert keys.authenticate(key) is not None
    assert store.gets == 2


def test_a_revoked_key_works_until_its_cache_entry_ends_then_is_refused(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    function = api_keys(store, clock)  # an execution environment of the authorizer
    operator = api_keys(store, clock, seconds=0)  # the CLI
    key, record = operator.create(ACME)
    assert function.authenticate(key) is not None
    operator.revoke(record.key_id)
    clock.advance(29)
    assert function.authenticate(key) is not None  # still cached here: the price of the cache
    clock.advance(1)
    assert function.authenticate(key) is None


def test_unknown_keys_are_remembered_briefly_so_a_new_key_works_within_seconds(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    function = api_keys(store, clock)
    key = "sk-made-a-moment-later"
    assert function.authenticate(key) is None
    api_keys(store, clock, seconds=0).register(key, ACME)
    assert function.authenticate(key) is None  # the miss is remembered ...
    assert store.gets == 1
    clock.advance(5)
    assert function.authenticate(key) is not None  # ... for 5 s, not the 30 s of a hit


def test_zero_seconds_turns_the_cache_off(store: MemoryApiKeyStore, clock: KeyClock) -> None:
    keys = api_keys(store, clock, seconds=0)
    key, record = keys.create(ACME)
    assert keys.authenticate(key) is not None
    keys.revoke(record.key_id)
    assert keys.authenticate(key) is None
    assert store.gets == 2


def test_the_cache_is_bounded(clock: KeyClock) -> None:
    cache = KeyCache(30, max_entries=3, clock=clock.monotonic)
    loads: list[str] = []

    def load(key_hash: str) -> ApiKeyRecord | None:
        loads.append(key_hash)
        return None

    for name in ("a", "b", "c", "d"):  # a stream of random keys
        cache.lookup(name, load)
    cache.lookup("d", load)
    cache.lookup("a", load)  # evicted as the oldest
    assert loads == ["a", "b", "c", "d", "a"]


def test_registering_a_key_forgets_what_this_environment_remembered(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    keys = api_keys(store, clock)
    assert keys.authenticate("sk-dev") is None
    keys.register("sk-dev", ACME)  # the local stack seeds its dev keys this way
    assert keys.authenticate("sk-dev") is not None


@pytest.mark.parametrize(("value", "seconds"), [(None, 30.0), ("", 30.0), ("0", 0.0), ("2.5", 2.5)])
def test_cache_seconds_come_from_the_environment(value: str | None, seconds: float) -> None:
    env = {} if value is None else {"SPOOL_AUTH_CACHE_SECONDS": value}
    assert cache_seconds_from_env(env) == seconds


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_cache_setting_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        cache_seconds_from_env({"SPOOL_AUTH_CACHE_SECONDS": value})
    assert caught.value.details["variable"] == "SPOOL_AUTH_CACHE_SECONDS"


# ---------------------------------------------------------------- list, revoke, rotate


def test_list_shows_a_tenants_keys_or_everyones_and_never_a_key_or_its_hash(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    keys = api_keys(store, clock, seconds=0)
    key1, first = keys.create(ACME, "ci")
    clock.advance(1)
    key2, second = keys.create(ACME, "laptop")
    keys.create(GLOBEX)
    keys.revoke(second.key_id)
    acme = keys.summaries(ACME)
    assert [s["key_id"] for s in acme] == [first.key_id, second.key_id]  # oldest first
    assert [s["status"] for s in acme] == ["active", "revoked"]
    assert acme[0] == {
        "key_id": first.key_id,
        "tenant": "acme",
        "description": "ci",
        "created_at": "2026-11-27T04:00:00.000Z",
        "status": "active",
        "revoked_at": None,
        "expires_at": None,
        "replaced_by": None,
    }
    assert acme[1]["revoked_at"] == "2026-11-27T04:00:01.000Z"
    shown = str(keys.summaries())
    assert {s["tenant"] for s in keys.summaries()} == {"acme", "globex"}
    for secret in (key1, key2, first.key_hash, second.key_hash):
        assert secret not in shown


def test_revoke_keeps_the_record_is_idempotent_and_respects_the_tenant(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    keys = api_keys(store, clock, seconds=0)
    key, record = keys.create(ACME)
    with pytest.raises(ApiKeyNotFound):
        keys.revoke(record.key_id, tenant=GLOBEX)  # another tenant's key is not found
    assert keys.authenticate(key) is not None
    revoked = keys.revoke(record.key_id, tenant=ACME)
    assert (revoked.status, revoked.revoked_at) == ("revoked", "2026-11-27T04:00:00.000Z")
    clock.advance(60)
    assert keys.revoke(record.key_id).revoked_at == revoked.revoked_at  # the first time stays
    assert store.items[record.key_hash].tenant_id == "acme"  # kept, for audit
    with pytest.raises(ApiKeyNotFound) as caught:
        keys.revoke("key_unknown")
    assert caught.value.details == {"key_id": "key_unknown"}


def test_rotate_issues_a_new_key_for_the_tenant_and_revokes_the_old_one(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    keys = api_keys(store, clock, seconds=0)
    old_key, old = keys.create(ACME, "ci")
    rotation = keys.rotate(old.key_id)
    assert rotation.new.tenant_id == "acme"
    assert rotation.new.description == "ci"
    assert rotation.key != old_key and hash_api_key(rotation.key) == rotation.new.key_hash
    assert rotation.old.status == "revoked"
    assert keys.authenticate(old_key) is None
    assert keys.authenticate(rotation.key) is not None
    with pytest.raises(ApiKeyRevoked):  # a revoked key has nothing left to rotate
        keys.rotate(old.key_id)


def test_rotate_with_grace_keeps_the_old_key_working_until_the_grace_ends(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    function = api_keys(store, clock)
    operator = api_keys(store, clock, seconds=0)
    old_key, old = operator.create(ACME)
    assert function.authenticate(old_key) is not None  # cached in the function from here on
    rotation = operator.rotate(old.key_id, grace_seconds=300, description="rotated")
    assert rotation.old.expires_at == "2026-11-27T04:05:00.000Z"
    assert rotation.old.replaced_by == rotation.new.key_id
    assert rotation.new.description == "rotated"
    assert [s["status"] for s in operator.summaries(ACME)] == ["active", "active"]
    clock.advance(299)
    assert function.authenticate(old_key) is not None
    assert operator.authenticate(old_key) is not None
    clock.advance(1)
    # The expiry time travels in the record: the cached copy ends at the same moment.
    assert function.authenticate(old_key) is None
    assert operator.authenticate(old_key) is None
    assert function.authenticate(rotation.key) is not None
    status = {s["key_id"]: s["status"] for s in operator.summaries(ACME)}
    assert status == {old.key_id: "expired", rotation.new.key_id: "active"}


def test_a_second_rotation_never_extends_the_first_grace(store: MemoryApiKeyStore, clock: KeyClock) -> None:
    keys = api_keys(store, clock, seconds=0)
    _, old = keys.create(ACME)
    keys.rotate(old.key_id, grace_seconds=60)
    again = keys.rotate(old.key_id, grace_seconds=3600)
    assert again.old.expires_at == "2026-11-27T04:01:00.000Z"
    assert again.old.replaced_by == again.new.key_id
    # rotated once more during its grace, without one: revoked, its record naming the latest key
    last = keys.rotate(old.key_id)
    assert (last.old.status, last.old.replaced_by) == ("revoked", last.new.key_id)


def test_records_written_before_revocation_existed_still_read(clock: KeyClock) -> None:
    legacy = ApiKeyRecord.model_validate(
        {"key_hash": "h", "key_id": "key_1", "tenant_id": "acme", "created_at": "t", "disabled": True}
    )
    assert legacy.state(clock.now()) == "revoked"


# ---------------------------------------------------------------- usage key


def test_usage_key_is_the_tenants_stable_usage_plan_key() -> None:
    key = usage_key("acme")
    assert key == usage_key("acme")
    assert key != usage_key("globex")
    assert key.startswith("spool-usage-") and len(key) == len("spool-usage-") + 40
    assert "acme" not in key
    assert 20 <= len(key) <= 128  # API Gateway's bounds for an API key value


# ---------------------------------------------------------------- connections


class MemoryConnectionKeys:
    def __init__(self) -> None:
        self.items: dict[str, ConnectionIdentity] = {}
        self.reads = 0

    def identity(self, connection_id: str) -> ConnectionIdentity | None:
        self.reads += 1
        return self.items.get(connection_id)


@dataclass
class RecordingCloser:
    closed: list[tuple[str, SpoolError, str | None]] = field(default_factory=list)

    def close(self, connection_id: str, error: SpoolError, request_id: str | None) -> None:
        self.closed.append((connection_id, error, request_id))


def test_a_chosen_key_already_stored_keeps_its_record_and_id(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    """Dev keys are ensured at each start of the local stack: the same id each time (links.events
    tokens name it), unless the stored key is not this tenant's active key."""
    keys = api_keys(store, clock, seconds=0)
    first = keys.ensure("sk-dev", ACME, "dev key")
    assert keys.ensure("sk-dev", ACME, "dev key") == first
    other = keys.ensure("sk-dev", Tenant("other"), "dev key")
    assert (other.tenant_id, other.key_id != first.key_id) == ("other", True)
    keys.revoke(other.key_id)
    again = keys.ensure("sk-dev", Tenant("other"), "dev key")
    assert again.key_id != other.key_id and keys.authenticate("sk-dev") == again


def test_a_connection_is_closed_once_its_key_is_revoked(store: MemoryApiKeyStore, clock: KeyClock) -> None:
    operator = api_keys(store, clock, seconds=0)
    _, record = operator.create(ACME)
    connections, closer = MemoryConnectionKeys(), RecordingCloser()
    guard = ConnectionGuard(api_keys(store, clock), connections, closer)
    guard.admit("conn-1", record)
    assert guard.allowed("conn-1")
    assert guard.allowed("conn-legacy")  # opened before connections recorded their key
    operator.revoke(record.key_id)
    assert guard.allowed("conn-1")  # within the cache lifetime
    clock.advance(30)
    assert not guard.allowed("conn-1")
    guard.close("conn-1", "req-1")
    ((closed, error, request_id),) = closer.closed
    assert (closed, request_id) == ("conn-1", "req-1")
    assert (error.code, error.message) == ("unauthorized", REVOKED_MESSAGE)
    assert error.suggestions
    assert connections.reads == 1  # which key a connection uses is remembered (the legacy lookup)


def test_who_a_connection_is_is_known_without_a_read_where_it_was_admitted(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    operator = api_keys(store, clock, seconds=0)
    _, record = operator.create(ACME)
    identity = ConnectionIdentity(record.tenant_id, record.key_hash)
    connections = MemoryConnectionKeys()
    connections.items["conn-elsewhere"] = identity
    guard = ConnectionGuard(api_keys(store, clock), connections, RecordingCloser())
    guard.admit("conn-here", record)
    assert guard.identity("conn-here") == identity and guard.allowed("conn-here")
    assert connections.reads == 0  # $connect and subscribe in the same environment: nothing read
    assert guard.identity("conn-elsewhere") == identity and guard.allowed("conn-elsewhere")
    assert connections.reads == 1  # admitted by another environment: one read tells tenant and key
    assert guard.allowed("conn-a-subscription-names", record.key_hash)  # its key given: nothing read
    assert connections.reads == 1
    assert guard.identity("conn-never") is None and guard.allowed("conn-never")
    operator.revoke(record.key_id)
    clock.advance(30)
    assert guard.identity("conn-elsewhere") == identity and not guard.allowed("conn-elsewhere")
    assert not guard.allowed("conn-a-subscription-names", record.key_hash)
    assert connections.reads == 2


@dataclass
class StubJob:
    status: str = "running"
    terminal: bool = False


class OneJobLog:
    def __init__(self, chunks: int) -> None:
        self.chunks = [
            Chunk(sequence_id=n, text=f"<{n}>", created_at="t", tokens=1, tokens_total=n)
            for n in range(1, chunks + 1)
        ]

    def get(self, job_id: str) -> StubJob:
        return StubJob()

    def mark_subscribed(self, job_id: str) -> StubJob:
        return StubJob()

    def after(self, job_id: str, after: int, limit: int, *, consistent: bool = True) -> list[Chunk]:
        return [c for c in self.chunks if c.sequence_id > after][:limit]


class RecordingPusher:
    def __init__(self) -> None:
        self.sent: dict[str, list[dict[str, Any]]] = {}

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        self.sent.setdefault(connection_id, []).append(message)
        return True


def test_the_fanout_closes_a_revoked_keys_connection_and_keeps_serving_the_others(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    operator = api_keys(store, clock, seconds=0)
    _, revoked = operator.create(ACME)
    _, kept = operator.create(ACME)
    closer, subscriptions, pusher = RecordingCloser(), MemorySubscriptionStore(), RecordingPusher()
    guard = ConnectionGuard(api_keys(store, clock), MemoryConnectionKeys(), closer)
    guard.admit("conn-revoked", revoked)
    guard.admit("conn-kept", kept)
    log = OneJobLog(2)
    fanout = Fanout(log, log, subscriptions, pusher)  # type: ignore[arg-type]
    for connection in ("conn-revoked", "conn-kept"):
        subscriptions.put(Subscription("job_1", connection, 0))
    fanout.deliver("job_1", chunks=log.chunks, access=guard)
    assert [m["sequence_id"] for m in pusher.sent["conn-revoked"]] == [1, 2]
    operator.revoke(revoked.key_id)
    clock.advance(30)
    log.chunks.append(Chunk(sequence_id=3, text="<3>", created_at="t", tokens=1, tokens_total=3))
    fanout.deliver("job_1", chunks=log.chunks[-1:], access=guard, request_id="invocation-2")
    assert [m["sequence_id"] for m in pusher.sent["conn-revoked"]] == [1, 2]  # nothing more
    assert [m["sequence_id"] for m in pusher.sent["conn-kept"]] == [1, 2, 3]
    assert [(connection, request_id) for connection, _, request_id in closer.closed] == [
        ("conn-revoked", "invocation-2")
    ]
    # as the SSE stream's error does: which job, the last chunk sent of it, and how to read the rest
    error = closer.closed[0][1]
    assert error.details == {"job_id": "job_1", "last_sequence_id": 2}
    assert '"job_id": "job_1"' in error.suggestions[0] and "active key" in error.suggestions[0]
    assert set(subscriptions.items) == {("job_1", "conn-kept")}


def test_a_subscription_names_its_key_so_a_fanout_elsewhere_checks_it_without_reading_the_connection(
    store: MemoryApiKeyStore, clock: KeyClock
) -> None:
    operator = api_keys(store, clock, seconds=0)
    _, revoked = operator.create(ACME)
    _, kept = operator.create(ACME)
    connections, closer = MemoryConnectionKeys(), RecordingCloser()
    # a fanout environment that admitted neither connection (their $connect ran elsewhere)
    guard = ConnectionGuard(api_keys(store, clock), connections, closer)
    subscriptions, pusher, log = MemorySubscriptionStore(), RecordingPusher(), OneJobLog(1)
    subscribing = Fanout(log, log, subscriptions, RecordingPusher())  # type: ignore[arg-type]
    for connection, record in (("conn-revoked", revoked), ("conn-kept", kept)):
        subscribing.subscribe("job_1", connection, 1, key_hash=record.key_hash)
    operator.revoke(revoked.key_id)
    clock.advance(30)
    log.chunks.append(Chunk(sequence_id=2, text="<2>", created_at="t", tokens=1, tokens_total=2))
    Fanout(log, log, subscriptions, pusher).deliver("job_1", chunks=log.chunks[-1:], access=guard)  # type: ignore[arg-type]
    assert [m["sequence_id"] for m in pusher.sent["conn-kept"]] == [2]
    assert "conn-revoked" not in pusher.sent
    assert [connection for connection, _, _ in closer.closed] == ["conn-revoked"]
    assert connections.reads == 0
