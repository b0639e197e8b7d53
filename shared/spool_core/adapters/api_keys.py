"""The API key table (one item per key, keyed by the key's hash), the key each WebSocket connection
opened with, and the tenants' API Gateway usage keys.

The key table has one index (template.yaml), ``TenantIndex``: ``tenant_id`` and ``key_id``, all
attributes. It lists a tenant's keys, and finds a key by the id operators see (the table's own key is
the hash) with a Query when the tenant is known; without it, finding a key by id scans the table (an
operator's command, on a table of one item per key). One index, not two, because CloudFormation adds
at most one index to an existing table per stack update.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import ClientError

from spool_core.adapters.aws import error_code
from spool_core.adapters.dynamodb import deserialize, serialize
from spool_core.auth import ApiKeyRecord, ConnectionIdentity, usage_key
from spool_core.errors import SpoolError

if TYPE_CHECKING:
    from mypy_boto3_apigateway import APIGatewayClient
    from mypy_boto3_dynamodb import DynamoDBClient

TENANT_INDEX = "TenantIndex"
GONE = {"GoneException", "410"}


class DynamoApiKeyStore:
    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def get(self, key_hash: str) -> ApiKeyRecord | None:
        response = self._client.get_item(
            TableName=self._table, Key=serialize({"key_hash": key_hash}), ConsistentRead=True
        )
        item = response.get("Item")
        return ApiKeyRecord.model_validate(deserialize(item)) if item else None

    def put(self, record: ApiKeyRecord) -> None:
        self._client.put_item(TableName=self._table, Item=serialize(record.model_dump(exclude_none=True)))

    def by_key_id(self, key_id: str, tenant_id: str | None = None) -> ApiKeyRecord | None:
        if tenant_id is not None:
            found = self._pages(
                "query",
                IndexName=TENANT_INDEX,
                KeyConditionExpression="tenant_id = :tenant AND key_id = :key_id",
                ExpressionAttributeValues=serialize({":tenant": tenant_id, ":key_id": key_id}),
            )
        else:
            found = self._pages(
                "scan",
                FilterExpression="key_id = :key_id",
                ExpressionAttributeValues=serialize({":key_id": key_id}),
            )
        for record in found:
            return self.get(record.key_hash)  # the index is eventually consistent: read the item itself
        return None

    def list_for_tenant(self, tenant_id: str) -> list[ApiKeyRecord]:
        return list(
            self._pages(
                "query",
                IndexName=TENANT_INDEX,
                KeyConditionExpression="tenant_id = :tenant",
                ExpressionAttributeValues=serialize({":tenant": tenant_id}),
            )
        )

    def list_all(self) -> list[ApiKeyRecord]:
        return list(self._pages("scan"))

    def _pages(self, operation: Literal["query", "scan"], **kwargs: Any) -> Iterator[ApiKeyRecord]:
        client: Any = self._client  # one loop for both operations' pages
        for page in client.get_paginator(operation).paginate(TableName=self._table, **kwargs):
            for item in page.get("Items", []):
                yield ApiKeyRecord.model_validate(deserialize(item))

    def revoke(self, key_hash: str, revoked_at: str, replaced_by: str | None = None) -> ApiKeyRecord:
        expression = "SET #status = :revoked, revoked_at = if_not_exists(revoked_at, :at)"
        values: dict[str, Any] = {":revoked": "revoked", ":at": revoked_at}
        if replaced_by is not None:  # a rotation: its record names the key that replaced it last
            expression += ", replaced_by = :by"
            values[":by"] = replaced_by
        return self._update(key_hash, expression, values)

    def expire(self, key_hash: str, expires_at: str, replaced_by: str) -> ApiKeyRecord:
        return self._update(
            key_hash,
            "SET expires_at = :at, replaced_by = :by",
            {":at": expires_at, ":by": replaced_by},
        )

    def _update(self, key_hash: str, expression: str, values: dict[str, Any]) -> ApiKeyRecord:
        extra: dict[str, Any] = (
            {"ExpressionAttributeNames": {"#status": "status"}} if "#status" in expression else {}
        )
        response = self._client.update_item(
            TableName=self._table,
            Key=serialize({"key_hash": key_hash}),
            UpdateExpression=expression,
            ConditionExpression="attribute_exists(key_hash)",  # an update never creates a key
            ExpressionAttributeValues=serialize(values),
            ReturnValues="ALL_NEW",
            **extra,
        )
        return ApiKeyRecord.model_validate(deserialize(response["Attributes"]))


class DynamoConnectionKeys:
    """The tenant and key a WebSocket connection opened with: ``tenant_id``, ``key_id`` and
    ``key_hash`` on the connection's own item (``conn#<id>`` / ``connection`` in the connections table,
    which the connection store writes with them at ``$connect``), so the item's deletion at
    ``$disconnect`` takes them along."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    @staticmethod
    def _key(connection_id: str) -> dict[str, Any]:
        return serialize({"pk": f"conn#{connection_id}", "sk": "connection"})

    def identity(self, connection_id: str) -> ConnectionIdentity | None:
        response = self._client.get_item(
            TableName=self._table, Key=self._key(connection_id), ConsistentRead=True
        )
        item = deserialize(response.get("Item") or {})
        if not item.get("tenant_id"):
            return None
        return ConnectionIdentity(
            str(item["tenant_id"]), str(item["key_hash"]) if item.get("key_hash") else None
        )


class ManagementApiCloser:
    """Ends a WebSocket connection through the API Gateway management API: the error as the last
    frame (``{"type": "error", "error": {...}}``, as the WebSocket function's other errors), then
    ``delete_connection``. A connection that is gone already is not an error."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def close(self, connection_id: str, error: SpoolError, request_id: str | None) -> None:
        from spool_core.api.errors import envelope  # the one wire shape of errors (a heavier import)

        frame = json.dumps({"type": "error", **envelope(error, request_id)}).encode()
        try:
            self._client.post_to_connection(ConnectionId=connection_id, Data=frame)
            self._client.delete_connection(ConnectionId=connection_id)
        except ClientError as exc:
            if error_code(exc) not in GONE:
                raise


class ApiGatewayUsageKeys:
    """Each tenant's API Gateway API key, attached to the stack's usage plan.

    The REST API meters and throttles by usage plan, with the API key taken from the authorizer's
    ``usageIdentifierKey`` (``usage_key(tenant)``); a request whose usage key is not in the plan is
    refused with 403. So a tenant's first Spool key needs this API key to exist in the plan: named
    ``spool-<tenant>``, with that value. Creating it is idempotent (found by value, a conflict on
    create or attach means it is there already).
    """

    def __init__(self, client: APIGatewayClient, usage_plan_id: str) -> None:
        self._client = client
        self._plan = usage_plan_id

    def ensure(self, tenant_id: str) -> str:
        """The tenant's API key id, created, enabled and attached to the plan if it was not."""
        name, value = f"spool-{tenant_id}", usage_key(tenant_id)
        found = self._find(value, name)
        if found is None:
            try:
                key_id = self._client.create_api_key(name=name, value=value, enabled=True)["id"]
            except ClientError as exc:
                if error_code(exc) != "ConflictException":
                    raise
                found = self._find(value, None)  # there under another name, or a concurrent create
                if found is None:
                    raise
        if found is not None:
            key_id = found["id"]
            if not found.get("enabled", True):
                self._client.update_api_key(
                    apiKey=key_id, patchOperations=[{"op": "replace", "path": "/enabled", "value": "true"}]
                )
        try:
            self._client.create_usage_plan_key(usagePlanId=self._plan, keyId=key_id, keyType="API_KEY")
        except ClientError as exc:
            if error_code(exc) != "ConflictException":
                raise
        return key_id

    def _find(self, value: str, name: str | None) -> dict[str, Any] | None:
        query: dict[str, Any] = {"includeValues": True}
        if name:
            query["nameQuery"] = name
        for page in self._client.get_paginator("get_api_keys").paginate(**query):
            for item in page.get("items", []):
                if item.get("value") == value:
                    return dict(item)
        return None
