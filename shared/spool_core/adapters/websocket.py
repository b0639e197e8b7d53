"""Connections, subscriptions and the @connections management API."""

from __future__ import annotations

import contextlib
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

    def lock(
        self, job_id: str, connection_id: str, owner: str, now: float, until: float
    ) -> Subscription | None:
        try:
            item = self._table.update(
                JOB_KIND,
                job_id,
                "SET sending_until = :until, sender = :owner",
                sort=self._sort(connection_id),
                condition=(
                    "attribute_exists(pk) AND (attribute_not_exists(sending_until) OR sending_until < :now)"
                ),
                values={":until": until, ":owner": owner, ":now": now},
            )
        except ConditionFailed:
            return None
        return self._subscription(item)

    def unlock(self, job_id: str, connection_id: str, owner: str) -> None:
        # Conditional on still owning it: never re-creates a deleted subscription (UpdateItem upserts).
        self._held(job_id, connection_id, owner, "SET sending_until = :value", 0)

    def advance(self, job_id: str, connection_id: str, owner: str, new: int) -> None:
        self._held(job_id, connection_id, owner, "SET last_sent = :value", new)

    def mark_done(self, job_id: str, connection_id: str) -> bool:
        try:
            self._table.update(
                JOB_KIND,
                job_id,
                "SET done_sent = :yes",
                sort=self._sort(connection_id),
                condition="done_sent = :no",
                values={":yes": True, ":no": False},
            )
        except ConditionFailed:
            return False
        return True

    def _held(self, job_id: str, connection_id: str, owner: str, expression: str, value: Any) -> None:
        with contextlib.suppress(ConditionFailed):  # deleted meanwhile, or the lock expired and moved on
            self._table.update(
                JOB_KIND,
                job_id,
                expression,
                sort=self._sort(connection_id),
                condition="sender = :owner",
                values={":value": value, ":owner": owner},
            )

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
