"""The API key table: one item per key, keyed by the key's hash."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spool_core.adapters.dynamodb import deserialize, serialize
from spool_core.auth import ApiKeyRecord

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


class DynamoApiKeyStore:
    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def get(self, key_hash: str) -> ApiKeyRecord | None:
        response = self._client.get_item(TableName=self._table, Key=serialize({"key_hash": key_hash}))
        item = response.get("Item")
        return ApiKeyRecord.model_validate(deserialize(item)) if item else None

    def put(self, record: ApiKeyRecord) -> None:
        self._client.put_item(TableName=self._table, Item=serialize(record.model_dump()))
