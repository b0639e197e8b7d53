"""The sparse list indexes of the jobs and contexts tables, read through one tenant's scope.

A listed item carries ``list_key`` (its tenant) and ``list_position`` (creation time in ms, zero-padded,
then its id; see ``spool_core.listing``); a job also carries ``status_key`` (tenant and status). Items
without them (idempotency records, blob entries, upload counters, items written before listing
existed) are in no index. The partition key of every query is built from the table's scope, so a
listing can only ever read the caller's tenant.
"""

from __future__ import annotations

from typing import Any

from spool_core.adapters.dynamodb import ScopedTable, deserialize, serialize
from spool_core.tenancy import SEPARATOR

LIST_INDEX = "ListIndex"
STATUS_INDEX = "StatusIndex"
LIST_KEY = "list_key"
STATUS_KEY = "status_key"
LIST_POSITION = "list_position"


def list_attributes(table: ScopedTable, position: str) -> dict[str, str]:
    """The attributes that put an item of the table's tenant in its list index."""
    return {LIST_KEY: table.scope.tenant.id, LIST_POSITION: position}


def status_key(table: ScopedTable, status: str) -> str:
    return f"{table.scope.tenant.id}{SEPARATOR}{status}"


def query_index(
    table: ScopedTable, index: str, key_name: str, key_value: str, limit: int, before: str | None
) -> list[dict[str, Any]]:
    """Up to ``limit`` items of one index partition, newest position first, strictly before ``before``.
    One Query unless DynamoDB stops at its 1 MB page first (then it continues where it stopped)."""
    condition = "#k = :k" + (" AND #p < :before" if before is not None else "")
    values: dict[str, Any] = {":k": key_value}
    if before is not None:
        values[":before"] = before
    kwargs: dict[str, Any] = {
        "TableName": table.name,
        "IndexName": index,
        "KeyConditionExpression": condition,
        "ExpressionAttributeNames": {"#k": key_name, **({"#p": LIST_POSITION} if before is not None else {})},
        "ExpressionAttributeValues": serialize(values),
        "ScanIndexForward": False,
    }
    found: list[dict[str, Any]] = []
    while len(found) < limit:
        kwargs["Limit"] = limit - len(found)
        response = table.client.query(**kwargs)
        found.extend(deserialize(raw) for raw in response.get("Items", []))
        if "LastEvaluatedKey" not in response:
            break
        kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
    return found[:limit]


__all__ = [
    "LIST_INDEX",
    "LIST_KEY",
    "LIST_POSITION",
    "STATUS_INDEX",
    "STATUS_KEY",
    "list_attributes",
    "query_index",
    "status_key",
]
