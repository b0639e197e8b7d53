"""`spool keys create` writes a hashed key into the stack's key table, found through CloudFormation."""

from __future__ import annotations

import pytest

from spool.cli import main
from spool.devstack.provision import StackDescription
from spool_core import bootstrap


def test_keys_create_finds_the_table_in_the_stack_and_the_key_works(
    stack: StackDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "keys",
                "create",
                "--tenant",
                "acme",
                "--stack-name",
                stack.stack_name,
                "--endpoint-url",
                stack.endpoint_url,
            ]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    record = bootstrap.api_keys().authenticate(key)
    assert record is not None
    assert record.tenant_id == "acme"
    assert (
        main(
            [
                "keys",
                "create",
                "--tenant",
                "globex",
                "--table",
                stack.refs["ApiKeysTable"],
                "--endpoint-url",
                stack.endpoint_url,
            ]
        )
        == 0
    )
