"""Connections, subscriptions and the @connections management API."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable, deserialize, serialize
from spool_core.subscriptions import Subscription

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

CONNECTION_TTL_SECONDS = 2 * 3600  # API Gateway closes WebSocket connections after two hours
JOB_KIND = "job"


class DynamoConnectionStore:
    """``conn#<id>``: which tenant a connection authenticated as (not tenant-scoped: looked up by id)."""

    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def put(self, connection_id: str, tenant_id: str) -> None:
        item = {
            "pk": f"conn#{connection_id}",
            "sk": "connection",
            "tenant_id": tenant_id,
            "ttl": int(time.time()) + CONNECTION_TTL_SECONDS,
        }
        self._client.put_item(TableName=self._table, Item=serialize(item))

    def tenant(self, connection_id: str) -> str | None:
        response = self._client.get_item(
            TableName=self._table, Key=serialize({"pk": f"conn#{connection_id}", "sk": "connection"})
        )
        item = response.get("Item")
        return str(deserialize(item)["tenant_id"]) if item else None

    def delete(self, connection_id: str) -> None:
        self._client.delete_item(
            TableName=self._table, Key=serialize({"pk": f"conn#{connection_id}", "sk": "connection"})
        )


class DynamoSubscriptionStore:
    """``<tenant>#job#<job_id>`` / ``sub#<connection>``: the tenant's subscriptions to one job."""

    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    @staticmethod
    def _sort(connection_id: str) -> dict[str, str]:
        return {"sk": f"sub#{connection_id}"}

    def put(self, subscription: Subscription) -> None:
        self._table.put(
            JOB_KIND,
            subscription.job_id,
            {
                "sk": f"sub#{subscription.connection_id}",
                "connection_id": subscription.connection_id,
                "job_id": subscription.job_id,
                "last_sent": subscription.last_sent,
                "done_sent": False,
                "ttl": int(time.time()) + CONNECTION_TTL_SECONDS,
            },
        )

    def for_job(self, job_id: str) -> list[Subscription]:
        items = self._table.query(
            JOB_KIND, job_id, sort_condition="begins_with(sk, :sub)", values={":sub": "sub#"}
        )
        return [self._subscription(item) for item in items]

    def get(self, job_id: str, connection_id: str) -> Subscription | None:
        item = self._table.get(JOB_KIND, job_id, sort=self._sort(connection_id))
        return self._subscription(item) if item else None

    def advance(self, job_id: str, connection_id: str, old: int, new: int) -> bool:
        return self._swap(job_id, connection_id, "last_sent", old, new)

    def mark_done(self, job_id: str, connection_id: str) -> bool:
        return self._swap(job_id, connection_id, "done_sent", False, True)

    def _swap(self, job_id: str, connection_id: str, attribute: str, old: Any, new: Any) -> bool:
        """Compare-and-set of one attribute of a subscription: True if this caller made the change."""
        try:
            self._table.update(
                JOB_KIND,
                job_id,
                f"SET {attribute} = :new",
                sort=self._sort(connection_id),
                condition=f"{attribute} = :old",
                values={":old": old, ":new": new},
            )
        except ConditionFailed:
            return False
        return True

    def delete(self, job_id: str, connection_id: str) -> None:
        self._table.delete(JOB_KIND, job_id, sort=self._sort(connection_id))

    @staticmethod
    def _subscription(item: dict[str, Any]) -> Subscription:
        return Subscription(
            str(item["job_id"]),
            str(item["connection_id"]),
            int(item["last_sent"]),
            bool(item.get("done_sent")),
        )


class ManagementApiPusher:
    """``post_to_connection`` through the API Gateway management API (the local stack serves the same)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def send(self, connection_id: str, message: dict[str, Any]) -> bool:
        try:
            self._client.post_to_connection(ConnectionId=connection_id, Data=json.dumps(message).encode())
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"GoneException", "410"}:
                return False
            raise
        return True
