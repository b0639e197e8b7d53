"""Circuit state in the system table (not tenant data: one item per model, ``circuit#<model>``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from spool_core.adapters.dynamodb import deserialize, serialize
from spool_core.circuits import Circuit, circuit_item

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


class DynamoCircuitStore:
    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def get_many(self, model_ids: Iterable[str]) -> dict[str, Circuit]:
        keys = [serialize({"pk": f"circuit#{m}"}) for m in dict.fromkeys(model_ids)]
        found: dict[str, Circuit] = {}
        for start in range(0, len(keys), 100):
            request: Any = {self._table: {"Keys": keys[start : start + 100], "ConsistentRead": True}}
            response = self._client.batch_get_item(RequestItems=request)
            for raw in response.get("Responses", {}).get(self._table, []):
                item = deserialize(raw)
                item.pop("pk", None)
                known = {f.name for f in fields(Circuit)}
                circuit = Circuit(**{k: v for k, v in item.items() if k in known})  # older items: defaults
                found[circuit.model_id] = circuit
        return found

    def save(self, circuit: Circuit, expected_version: int) -> bool:
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Item": serialize({"pk": f"circuit#{circuit.model_id}", **circuit_item(circuit)}),
        }
        if expected_version == 0:
            kwargs["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            kwargs["ConditionExpression"] = "version = :v"
            kwargs["ExpressionAttributeValues"] = serialize({":v": expected_version})
        try:
            self._client.put_item(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True
