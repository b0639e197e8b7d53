"""Short-lived cached values in the system table (deep health results), expired by their own clock."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spool_core.adapters.dynamodb import deserialize, serialize

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


class DynamoCache:
    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def get(self, key: str) -> Mapping[str, Any] | None:
        item = self._client.get_item(TableName=self._table, Key=serialize({"pk": key})).get("Item")
        if not item:
            return None
        value = deserialize(item)
        if value["expires_at"] <= time.time():  # TTL deletion is lazy: check the time ourselves
            return None
        cached: dict[str, Any] = json.loads(value["value"])
        return cached

    def put(self, key: str, value: Mapping[str, Any], ttl_seconds: float) -> None:
        expires = time.time() + ttl_seconds
        item = {"pk": key, "value": json.dumps(value), "expires_at": expires, "ttl": int(expires) + 3600}
        self._client.put_item(TableName=self._table, Item=serialize(item))
