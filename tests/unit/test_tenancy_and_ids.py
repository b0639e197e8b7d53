from __future__ import annotations

import re

import pytest

from spool_core.clock import from_epoch, rfc3339
from spool_core.ids import new_id
from spool_core.tenancy import InvalidTenantId, Tenant, TenantScope


def test_keys_start_with_the_tenant_so_other_tenants_never_share_one() -> None:
    a, b = TenantScope(Tenant("acme")), TenantScope(Tenant("globex"))
    assert a.key("ctx", "ctx_1") == "acme#ctx#ctx_1"
    assert a.key("ctx", "ctx_1") != b.key("ctx", "ctx_1")
    assert TenantScope.tenant_of_key(b.key("job", "job_1")) == Tenant("globex")
    assert a.object_key("blobs", "abc") == "t/acme/blobs/abc"


@pytest.mark.parametrize("bad", ["", "a#b", "a/b", "x" * 65, "-lead", "sp ace"])
def test_tenant_ids_cannot_smuggle_separators(bad: str) -> None:
    with pytest.raises(InvalidTenantId):
        Tenant(bad)


def test_scope_rejects_parts_that_escape_their_place() -> None:
    scope = TenantScope(Tenant("acme"))
    with pytest.raises(ValueError, match="kind"):
        scope.key("a#b", "x")
    for parts in (("..",), ("a/b",), ("",)):
        with pytest.raises(ValueError, match="object key"):
            scope.object_key(*parts)


def test_ids_are_prefixed_and_carry_128_bits() -> None:
    ids = {new_id("ctx") for _ in range(1000)}
    assert len(ids) == 1000
    for ident in ids:
        assert re.fullmatch(r"ctx_[a-z2-7]{26}", ident)


def test_times_are_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339(from_epoch(1795716000.1234)) == "2026-11-26T18:00:00.123Z"
