"""Connections, subscriptions and the @connections management API."""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable, ShardedIndex, deserialize, serialize
from spool_core.due_ends import DueEnd
from spool_core.subscriptions import Subscription, Written
from spool_core.tenancy import Tenant, TenantScope

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

    from spool_core.auth import ApiKeyRecord

CONNECTION_TTL_SECONDS = 2 * 3600  # API Gateway closes WebSocket connections after two hours
JOB_KIND = "job"
# the due subscriptions (spool_core/due_ends.py), in the partition their connection's id picks
END_DUE = ShardedIndex("EndDueIndex", "due", 4, "end_due_shard", "end_due_ms")


class DynamoConnectionStore:
    """``conn#<id>``: which tenant a connection authenticated as, and with which key (not tenant-scoped:
    looked up by id, by ``spool_core.adapters.api_keys.DynamoConnectionKeys``)."""

    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def put(self, connection_id: str, key: ApiKeyRecord) -> None:
        """The connection, with the tenant and the key it authenticated with (one write)."""
        item = {
            "pk": f"conn#{connection_id}",
            "sk": "connection",
            "tenant_id": key.tenant_id,
            "key_id": key.key_id,
            "key_hash": key.key_hash,
            "ttl": int(time.time()) + CONNECTION_TTL_SECONDS,
        }
        self._client.put_item(TableName=self._table, Item=serialize(item))

    def delete(self, connection_id: str) -> None:
        self._client.delete_item(
            TableName=self._table, Key=serialize({"pk": f"conn#{connection_id}", "sk": "connection"})
        )


class DynamoSubscriptionStore:
    """``<tenant>#job#<job_id>`` / ``sub#<connection>``: the tenant's subscriptions to one job.

    Every write is one conditional ``UpdateItem``/``DeleteItem`` that returns the item as it was
    (``ALL_OLD``, also when its condition failed), so a sender never reads before it writes."""

    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    def _key(self, job_id: str, connection_id: str) -> dict[str, Any]:
        return self._table.key(JOB_KIND, job_id, {"sk": f"sub#{connection_id}"})

    def put(self, subscription: Subscription) -> None:
        lease = (  # held by its handler: due (``spool_core.due_ends``) until the handler lets go
            {
                "sender": subscription.sender,
                "sending_until_ms": subscription.sending_until_ms,
                "end_due_shard": END_DUE.shard(subscription.connection_id),
                "end_due_ms": subscription.sending_until_ms,
            }
            if subscription.sender
            else {}
        )
        self._table.put(
            JOB_KIND,
            subscription.job_id,
            {
                "sk": f"sub#{subscription.connection_id}",
                "connection_id": subscription.connection_id,
                "job_id": subscription.job_id,
                "last_sent": subscription.last_sent,
                "start": subscription.start,
                "done_sent": False,
                "wakes": 0,
                "served": 0,
                **lease,
                **({"key_hash": subscription.key_hash} if subscription.key_hash else {}),
                "ttl": int(time.time()) + CONNECTION_TTL_SECONDS,
            },
        )

    def for_job(self, job_id: str, *, consistent: bool = True) -> list[Subscription]:
        items = self._table.query(
            JOB_KIND,
            job_id,
            sort_condition="begins_with(sk, :sub)",
            values={":sub": "sub#"},
            consistent=consistent,
        )
        return [self._subscription(item) for item in items]

    def get(self, job_id: str, connection_id: str) -> Subscription | None:
        item = self._table.get(JOB_KIND, job_id, sort={"sk": f"sub#{connection_id}"})
        return self._subscription(item) if item else None

    def claim(
        self,
        job_id: str,
        connection_id: str,
        owner: str,
        *,
        prev: int,
        new: int,
        until_ms: int,
        made_for: int = 0,
    ) -> Written:
        return self._update(
            job_id,
            connection_id,
            "SET last_sent = :new, claimed_from = :from, " + _CLAIM,
            f"last_sent = :prev AND done_sent = :no AND {_LEASE_FREE}",
            {
                ":new": new,
                ":from": prev + 1,
                ":prev": prev,
                ":me": owner,
                ":until": until_ms,
                ":for": made_for,
                ":no": False,
            },
        )

    def claim_done(
        self, job_id: str, connection_id: str, owner: str, *, last: int, until_ms: int, made_for: int = 0
    ) -> Written:
        return self._update(
            job_id,
            connection_id,
            "SET done_sent = :yes, " + _CLAIM,
            f"last_sent = :last AND done_sent = :no AND {_LEASE_FREE}",
            {":last": last, ":me": owner, ":until": until_ms, ":for": made_for, ":yes": True, ":no": False},
        )

    def take_over(
        self,
        job_id: str,
        connection_id: str,
        owner: str,
        *,
        holder: str,
        now_ms: int,
        until_ms: int,
        made_for: int = 0,
    ) -> Written:
        return self._update(
            job_id,
            connection_id,
            "SET " + _CLAIM,  # the holder's last claim (its run, or done) becomes the taker's
            "sender = :holder AND sending_until_ms < :now",
            {":me": owner, ":holder": holder, ":now": now_ms, ":until": until_ms, ":for": made_for},
        )

    def release(self, job_id: str, connection_id: str, owner: str, *, wakes: int) -> Written:
        woken = "wakes = :wakes" if wakes else "(attribute_not_exists(wakes) OR wakes = :wakes)"
        return self._update(
            job_id,
            connection_id,
            "SET served = :wakes REMOVE sender, sending_until_ms, " + _NOT_DUE,
            f"sender = :me AND {woken}",
            {":me": owner, ":wakes": wakes},
        )

    def abandon(self, job_id: str, connection_id: str, owner: str, *, pushed: int) -> None:
        self._update(
            job_id,
            connection_id,
            "SET done_sent = :no, last_sent = :pushed"
            " REMOVE sender, sending_until_ms, claimed_by, claimed_for, " + _NOT_DUE,
            "sender = :me",
            {":me": owner, ":no": False, ":pushed": pushed},
        )

    def wake(
        self, job_id: str, connection_id: str, holder: str, *, now_ms: int, end: bool = False
    ) -> Written:
        due = {":due": END_DUE.shard(connection_id)} if end else {}
        return self._update(
            job_id,
            connection_id,
            # due by the lease as it stands in this very write (copied, not as the caller last saw it)
            ("SET end_due_shard = :due, end_due_ms = sending_until_ms " if end else "") + "ADD wakes :one",
            "sender = :holder AND sending_until_ms >= :now",
            {":one": 1, ":holder": holder, ":now": now_ms, **due},
        )

    def finish(self, job_id: str, connection_id: str, owner: str) -> None:
        with contextlib.suppress(ConditionFailed):  # replaced by a new subscription meanwhile: keep that
            self._call(
                self._table.client.delete_item,
                TableName=self._table.name,
                Key=self._key(job_id, connection_id),
                ConditionExpression="sender = :me",
                ExpressionAttributeValues=serialize({":me": owner}),
            )

    def delete(self, job_id: str, connection_id: str) -> None:
        self._table.delete(JOB_KIND, job_id, sort={"sk": f"sub#{connection_id}"})

    def _update(
        self, job_id: str, connection_id: str, expression: str, condition: str, values: dict[str, Any]
    ) -> Written:
        """A conditional update that never creates an item (``attribute_exists``), with the item as it
        was before, whether it applied or not."""
        try:
            response = self._call(
                self._table.client.update_item,
                TableName=self._table.name,
                Key=self._key(job_id, connection_id),
                UpdateExpression=expression,
                ConditionExpression=f"attribute_exists(pk) AND {condition}",
                ExpressionAttributeValues=serialize(values),
                ReturnValues="ALL_OLD",
            )
        except ConditionFailed as failed:
            return Written(False, self._subscription(failed.item) if failed.item else None)
        old = response.get("Attributes")
        return Written(True, self._subscription(deserialize(old)) if old else None)

    @staticmethod
    def _call(operation: Any, **kwargs: Any) -> Any:
        try:
            return operation(ReturnValuesOnConditionCheckFailure="ALL_OLD", **kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                old: Any = exc.response.get("Item")
                raise ConditionFailed(deserialize(old) if old else None) from exc
            raise

    @staticmethod
    def _subscription(item: dict[str, Any]) -> Subscription:
        return Subscription(
            str(item["job_id"]),
            str(item["connection_id"]),
            int(item["last_sent"]),
            bool(item.get("done_sent")),
            str(item["sender"]) if item.get("sender") else None,
            int(item.get("sending_until_ms", 0)),
            int(item.get("wakes", 0)),
            int(item.get("served", 0)),
            int(item.get("start", 0)),
            int(item.get("claimed_from", 0)),
            str(item["claimed_by"]) if item.get("claimed_by") else None,
            int(item.get("claimed_for", 0)),
            str(item["key_hash"]) if item.get("key_hash") else None,
            int(item["end_due_ms"]) if "end_due_ms" in item else None,
        )


class DynamoDueEnds:
    """The due subscriptions (``spool_core.due_ends``), every tenant's: a sparse index of the
    connections table (a subscription is in it while its handler holds it, and again when the job's
    end wakes a holder), spread over a few partitions. A system reader, as the sweeper's pending jobs
    are: keys and the due time from the index, the lease from the item."""

    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._client = client
        self._table = table

    def _key(self, end: DueEnd) -> dict[str, Any]:
        pk = TenantScope(Tenant(end.tenant_id)).key(JOB_KIND, end.job_id)
        return serialize({"pk": pk, "sk": f"sub#{end.connection_id}"})

    def due_before(self, now_ms: int, limit: int) -> list[DueEnd]:
        found = []
        for item in END_DUE.before(self._client, self._table, now_ms, limit):
            tenant_id, kind, job_id = TenantScope.parts_of_key(str(item["pk"]))
            if kind == JOB_KIND:
                connection_id = str(item["sk"]).removeprefix("sub#")
                found.append(DueEnd(tenant_id, job_id, connection_id, int(item["end_due_ms"])))
        return found[:limit]

    def lease_of(self, end: DueEnd) -> int | None:
        item = self._client.get_item(
            TableName=self._table,
            Key=self._key(end),
            ConsistentRead=True,
            ProjectionExpression="sending_until_ms, sk",
        ).get("Item")
        if item is None:
            return None
        return int(deserialize(item).get("sending_until_ms", 0))

    def postpone(self, end: DueEnd, until_ms: int | None) -> None:
        change: dict[str, Any] = (
            {
                "UpdateExpression": "SET end_due_ms = :until",
                "ExpressionAttributeValues": serialize({":until": until_ms}),
            }
            if until_ms is not None
            else {"UpdateExpression": "REMOVE " + _NOT_DUE}
        )
        with contextlib.suppress(self._client.exceptions.ConditionalCheckFailedException):
            self._client.update_item(
                TableName=self._table,
                Key=self._key(end),
                ConditionExpression="attribute_exists(pk)",
                **change,
            )


# The sending lease is free or already the caller's (one that ran out is taken over first).
_LEASE_FREE = "(attribute_not_exists(sender) OR sender = :me)"
# Out of the due subscriptions' index (its handler let go: the chunk stream sends the rest)
_NOT_DUE = "end_due_shard, end_due_ms"
# What every claim records besides its message: who made it, for which record, and the lease.
_CLAIM = "claimed_by = :me, claimed_for = :for, sender = :me, sending_until_ms = :until"


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
