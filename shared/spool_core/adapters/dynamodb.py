"""A DynamoDB table seen through one tenant's scope.

``ScopedTable`` is the only way the stores read or write tenant data: every partition key it sends
is built by the ``TenantScope``, so no call can name another tenant's item.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from spool_core.tenancy import TenantScope

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

PARTITION_KEY = "pk"

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


class ConditionFailed(Exception):
    """A conditional write found the item in another state; ``item`` holds it when DynamoDB returned it.
    For a transaction, ``reasons`` has one ``(code, item)`` per entry, in order (code ``None`` for
    the entries that were fine)."""

    def __init__(
        self,
        item: dict[str, Any] | None = None,
        reasons: list[tuple[str, dict[str, Any] | None]] | None = None,
    ) -> None:
        super().__init__("conditional check failed")
        self.item = item
        self.reasons = reasons or []


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, set):
        return {_plain(v) for v in value}
    return value


_SMALLEST_NUMBER = 1e-130  # DynamoDB's; smaller magnitudes are refused, not rounded
_BOTO3_WHOLE_DIGITS = 10**38  # ints from here on have more digits than boto3's context holds


def _dynamo(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _BOTO3_WHOLE_DIGITS:
        # boto3 keeps every digit of an int (10**38 is 39 digits: refused, decimal.Rounded), where
        # DynamoDB keeps 38 significant ones: trailing zeros go in the exponent (1E+38), exactly.
        digits = str(abs(value))
        significant = digits.rstrip("0")
        return Decimal(f"{'-' if value < 0 else ''}{significant}E{len(digits) - len(significant)}")
    if isinstance(value, float):
        # A float that validation let through (a temperature of 1e-237) is 0 to any reader.
        return Decimal(str(value)) if abs(value) >= _SMALLEST_NUMBER else Decimal(0)
    if isinstance(value, dict):
        return {k: _dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dynamo(v) for v in value]
    return value


def serialize(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(_dynamo(v)) for k, v in item.items()}


def deserialize(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(_deserializer.deserialize(v)) for k, v in item.items()}


@dataclass(frozen=True)
class ShardedIndex:
    """A sparse global index spread over a few partitions (``<prefix>#<n>`` in ``hash_key``), so it
    has no single hot key, and ordered by a number (``sort_key``): what a sweeper reads across
    tenants (the pending jobs, the due subscriptions)."""

    name: str
    prefix: str
    shards: int
    hash_key: str
    sort_key: str

    def shard(self, ident: str) -> str:
        """The partition ``ident``'s item goes in."""
        return f"{self.prefix}#{int(hashlib.sha256(ident.encode()).hexdigest(), 16) % self.shards}"

    def before(self, client: DynamoDBClient, table: str, bound: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` items of each partition with ``sort_key`` below ``bound`` (one Query a
        partition), lowest first across them, as plain values."""
        found = []
        for n in range(self.shards):
            response = client.query(
                TableName=table,
                IndexName=self.name,
                KeyConditionExpression=f"{self.hash_key} = :shard AND {self.sort_key} < :bound",
                ExpressionAttributeValues=serialize({":shard": f"{self.prefix}#{n}", ":bound": bound}),
                Limit=limit,
            )
            found += [deserialize(raw) for raw in response.get("Items", [])]
        return sorted(found, key=lambda item: int(item[self.sort_key]))


def _back_off(attempts: int, what: str) -> int:
    """Wait before resending what a batch call left unprocessed (throttled); give up after 8 tries."""
    attempts += 1
    if attempts > 8:
        raise RuntimeError(f"DynamoDB kept {what} unprocessed; retry later")
    time.sleep(min(1.0, 0.05 * 2**attempts))
    return attempts


class ScopedTable:
    def __init__(self, client: DynamoDBClient, table_name: str, scope: TenantScope) -> None:
        self._client = client
        self._table = table_name
        self._scope = scope

    @property
    def scope(self) -> TenantScope:
        return self._scope

    @property
    def client(self) -> DynamoDBClient:
        return self._client

    @property
    def name(self) -> str:
        return self._table

    def key(self, kind: str, ident: str, sort: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The serialized key of one of the tenant's items."""
        return serialize({PARTITION_KEY: self._scope.key(kind, ident), **(sort or {})})

    _key = key

    def put_request(
        self,
        kind: str,
        ident: str,
        attributes: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A put as one entry of a ``transact`` call (the current item comes back if it fails)."""
        request: dict[str, Any] = {
            "TableName": self._table,
            "Item": serialize({**attributes, PARTITION_KEY: self._scope.key(kind, ident)}),
        }
        self._add_condition(request, condition, names, values)
        return {"Put": request}

    def delete_request(
        self,
        kind: str,
        ident: str,
        *,
        sort: Mapping[str, Any] | None = None,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"TableName": self._table, "Key": self.key(kind, ident, sort)}
        self._add_condition(request, condition, names, values)
        return {"Delete": request}

    def check_request(
        self,
        kind: str,
        ident: str,
        condition: str,
        *,
        sort: Mapping[str, Any] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A condition on an item the transaction does not write, as one entry of a ``transact`` call."""
        request: dict[str, Any] = {"TableName": self._table, "Key": self.key(kind, ident, sort)}
        self._add_condition(request, condition, None, values)
        return {"ConditionCheck": request}

    def get(
        self,
        kind: str,
        ident: str,
        *,
        sort: Mapping[str, Any] | None = None,
        consistent: bool = True,
        attributes: Sequence[str] | None = None,
    ) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Key": self._key(kind, ident, sort),
            "ConsistentRead": consistent,
        }
        if attributes:
            kwargs["ProjectionExpression"] = ", ".join(f"#a{i}" for i in range(len(attributes)))
            kwargs["ExpressionAttributeNames"] = {f"#a{i}": name for i, name in enumerate(attributes)}
        response = self._client.get_item(**kwargs)
        item = response.get("Item")
        return deserialize(item) if item else None

    def get_many(
        self, kind: str, idents: Iterable[str], *, consistent: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Items by id (BatchGetItem, 100 keys a call, unprocessed keys retried); missing ids are absent."""
        keys = {self._scope.key(kind, ident): ident for ident in idents}
        pending = [serialize({PARTITION_KEY: pk}) for pk in keys]
        found: dict[str, dict[str, Any]] = {}
        attempts = 0
        while pending:
            batch, pending = pending[:100], pending[100:]
            request: Any = {self._table: {"Keys": batch, "ConsistentRead": consistent}}
            response = self._client.batch_get_item(RequestItems=request)
            for raw in response.get("Responses", {}).get(self._table, []):
                item = deserialize(raw)
                found[keys[item[PARTITION_KEY]]] = item
            left: Any = response.get("UnprocessedKeys") or {}
            unprocessed = left.get(self._table, {}).get("Keys", [])
            if unprocessed:
                attempts = _back_off(attempts, "keys")
                pending.extend(unprocessed)
        return found

    def put(
        self,
        kind: str,
        ident: str,
        attributes: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> None:
        item = {**attributes, PARTITION_KEY: self._scope.key(kind, ident)}
        kwargs: dict[str, Any] = {"TableName": self._table, "Item": serialize(item)}
        self._add_condition(kwargs, condition, names, values)
        self._write(self._client.put_item, kwargs)

    def update_request(
        self,
        kind: str,
        ident: str,
        expression: str,
        *,
        sort: Mapping[str, Any] | None = None,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The same update as ``update``, as one entry of a ``transact`` call."""
        request: dict[str, Any] = {
            "TableName": self._table,
            "Key": self._key(kind, ident, sort),
            "UpdateExpression": expression,
        }
        self._add_condition(request, condition, names, values)
        return {"Update": request}

    def delete_all(self, keys: Sequence[tuple[str, str]]) -> None:
        """Delete several items in one transaction."""
        items: Any = [
            {"Delete": {"TableName": self._table, "Key": self._key(kind, ident)}} for kind, ident in keys
        ]
        self._client.transact_write_items(TransactItems=items)

    def put_many(self, kind: str, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Unconditional puts of many items (BatchWriteItem, 25 a call, unprocessed items retried)."""
        pending = [
            {"PutRequest": {"Item": serialize({**attributes, PARTITION_KEY: self._scope.key(kind, ident)})}}
            for ident, attributes in items.items()
        ]
        attempts = 0
        while pending:
            batch, pending = pending[:25], pending[25:]
            request: Any = {self._table: batch}
            response = self._client.batch_write_item(RequestItems=request)
            left: Any = response.get("UnprocessedItems") or {}
            if left.get(self._table):
                attempts = _back_off(attempts, "items")
                pending.extend(left[self._table])

    def update(
        self,
        kind: str,
        ident: str,
        expression: str,
        *,
        sort: Mapping[str, Any] | None = None,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        kwargs = self.update_request(
            kind, ident, expression, sort=sort, condition=condition, names=names, values=values
        )["Update"]
        kwargs["ReturnValues"] = "ALL_NEW"
        response = self._write(self._client.update_item, kwargs)
        return deserialize(response.get("Attributes", {}))

    def delete(
        self, kind: str, ident: str, *, sort: Mapping[str, Any] | None = None, condition: str | None = None
    ) -> None:
        kwargs: dict[str, Any] = {"TableName": self._table, "Key": self._key(kind, ident, sort)}
        self._add_condition(kwargs, condition, None, None)
        self._write(self._client.delete_item, kwargs)

    def query(
        self,
        kind: str,
        ident: str,
        *,
        sort_condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
        limit: int | None = None,
        forward: bool = True,
        consistent: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Items of one partition, in sort-key order, paginated lazily up to ``limit`` items."""
        key_condition = "#pk = :pk" + (f" AND {sort_condition}" if sort_condition else "")
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeNames": {"#pk": PARTITION_KEY, **(names or {})},
            "ExpressionAttributeValues": serialize({":pk": self._scope.key(kind, ident), **(values or {})}),
            "ScanIndexForward": forward,
            "ConsistentRead": consistent,
        }
        remaining = limit
        while True:
            if remaining is not None:
                kwargs["Limit"] = remaining
            response = self._client.query(**kwargs)
            for raw in response.get("Items", []):
                yield deserialize(raw)
            if remaining is not None:
                remaining -= len(response.get("Items", []))
                if remaining <= 0:
                    return
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    @staticmethod
    def _add_condition(
        kwargs: dict[str, Any],
        condition: str | None,
        names: Mapping[str, str] | None,
        values: Mapping[str, Any] | None,
    ) -> None:
        if condition:
            kwargs["ConditionExpression"] = condition
            kwargs["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        if names:
            kwargs["ExpressionAttributeNames"] = dict(names)
        if values:
            kwargs["ExpressionAttributeValues"] = serialize(values)

    @staticmethod
    def _write(call: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return call(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                old: Any = exc.response.get("Item")
                raise ConditionFailed(deserialize(old) if old else None) from exc
            raise


CANCELLED_BY_STATE = ("ConditionalCheckFailed", "TransactionConflict")


def transact(client: DynamoDBClient, items: Sequence[Mapping[str, Any]]) -> None:
    """All the writes or none (TransactWriteItems, any tables). ``ConditionFailed`` (with a reason
    per entry, and the current item where a condition failed) when a condition failed or another
    transaction held an item; other errors propagate."""
    request: Any = list(items)
    try:
        client.transact_write_items(TransactItems=request)
    except ClientError as exc:
        response: Any = exc.response
        reasons = [
            (str(r.get("Code") or "None"), deserialize(r["Item"]) if r.get("Item") else None)
            for r in response.get("CancellationReasons", [])
        ]
        if exc.response["Error"]["Code"] == "TransactionCanceledException" and any(
            code in CANCELLED_BY_STATE for code, _ in reasons
        ):
            raise ConditionFailed(reasons=reasons) from exc
        if exc.response["Error"]["Code"] == "ValidationException" or any(
            code == "ValidationError" for code, _ in reasons
        ):
            raise Unstorable(exc.response["Error"].get("Message", "")) from exc  # never retried
        raise


class Unstorable(ValueError):
    """DynamoDB refused the request itself (an item over 400 KB, a value it cannot hold): the same
    request can never succeed, so it is not a lost reply to retry."""


def batch_get(
    client: DynamoDBClient, keys: Mapping[str, Sequence[Mapping[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Items by key from several tables in one BatchGetItem (strongly consistent; unprocessed keys
    retried), deserialized, by table."""
    pending: dict[str, list[Any]] = {
        table: list(table_keys) for table, table_keys in keys.items() if table_keys
    }
    found: dict[str, list[dict[str, Any]]] = {table: [] for table in keys}
    attempts = 0
    while pending:
        request: Any = {
            table: {"Keys": table_keys, "ConsistentRead": True} for table, table_keys in pending.items()
        }
        response = client.batch_get_item(RequestItems=request)
        for table, items in response.get("Responses", {}).items():
            found[table].extend(deserialize(item) for item in items)
        left: Any = response.get("UnprocessedKeys") or {}
        pending = {table: entry["Keys"] for table, entry in left.items() if entry.get("Keys")}
        if pending:
            attempts = _back_off(attempts, "keys")
    return found
