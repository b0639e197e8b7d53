"""Put on the stack's ``PYTHONPATH`` by tests/e2e/test_roles_cover_calls.py: the fork server imports
it at start, so every container forked from it records each AWS call it makes (the function, the
operation, and the tables, queues, buckets and secrets it names) to ``SPOOL_TEST_AWS_CALLS``, one
JSON line per call and a file per process. Does nothing unless that variable is set."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

_OUT = os.environ.get("SPOOL_TEST_AWS_CALLS")
_NAMED = ("TableName", "QueueUrl", "Bucket", "SecretId")
_TRANSACT = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
}


def _calls(operation: str, params: dict[str, Any]) -> Iterator[tuple[str, str | None, str | None]]:
    """(operation, resource, index) for each thing a call touches: a transaction's items one by one."""
    if operation == "TransactWriteItems":
        for item in params.get("TransactItems") or []:
            for kind, body in item.items():
                yield _TRANSACT.get(kind, kind), body.get("TableName"), None
        return
    tables = list(params.get("RequestItems") or {})
    if tables:
        for table in tables:
            yield operation, table, None
        return
    named = [params[key] for key in _NAMED if key in params]
    yield operation, (named[0] if named else None), params.get("IndexName")


def _install(out: str) -> None:
    import botocore.client

    lock = threading.Lock()
    base: Any = botocore.client.BaseClient
    original = base._make_api_call

    def recorded(client: Any, operation: str, params: Any) -> Any:
        with contextlib.suppress(Exception):  # recording never changes what the call does
            function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
            if function:
                service = client.meta.service_model.service_name
                lines = "".join(
                    json.dumps(
                        {
                            "function": function,
                            "service": service,
                            "operation": op,
                            "resource": res,
                            "index": idx,
                        }
                    )
                    + "\n"
                    for op, res, idx in _calls(operation, params if isinstance(params, dict) else {})
                )
                with lock, open(os.path.join(out, f"{os.getpid()}.jsonl"), "a") as sink:
                    sink.write(lines)
        return original(client, operation, params)

    base._make_api_call = recorded


if _OUT:
    _install(_OUT)
