"""The stack's DynamoDB endpoint behaves as AWS's does under concurrency: every request is one atomic
step. Every exactly-once mechanism of Spool (idempotency claims, token buckets, slots, leases, job
ends) relies on this; these tests fail on a store without atomic conditional writes."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from spool.devstack.provision import StackDescription
from tests.integration.conftest import client

THREADS = 50


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` on ``count`` threads released at once; returns each result or exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_conditional_counter_ends_exactly_at_its_bound(stack: StackDescription) -> None:
    ddb, table = client("dynamodb", stack), stack.refs["SystemTable"]
    key = {"pk": {"S": f"race#{uuid.uuid4().hex}"}}
    ddb.put_item(TableName=table, Item={**key, "n": {"N": "0"}})

    def increment(_: int) -> bool | str:
        try:
            ddb.update_item(
                TableName=table,
                Key=key,
                UpdateExpression="SET n = n + :one",
                ConditionExpression="n < :bound",
                ExpressionAttributeValues={":one": {"N": "1"}, ":bound": {"N": "14"}},
            )
        except ClientError as exc:
            return f"refused: {exc.response['Error']['Code']}"
        return True

    outcomes = run_together(THREADS, increment)
    final = ddb.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]["n"]["N"]
    assert (outcomes.count(True), int(final)) == (14, 14)
    assert set(outcomes) == {True, "refused: ConditionalCheckFailedException"}


def test_failed_transactions_never_erase_acknowledged_writes(stack: StackDescription) -> None:
    """A failing TransactWriteItems must not roll back writes that other requests made meanwhile
    (moto restores a copy of the table taken before the transaction started)."""
    ddb, table = client("dynamodb", stack), stack.refs["SystemTable"]
    run = uuid.uuid4().hex
    missing = {"pk": {"S": f"missing#{run}"}}

    def write_or_fail(i: int) -> str | None:
        for round_ in range(8):
            if i % 2:
                with_failure: Any = [
                    {"Put": {"TableName": table, "Item": {"pk": {"S": f"tx#{run}#{i}#{round_}"}}}},
                    {
                        "ConditionCheck": {
                            "TableName": table,
                            "Key": missing,
                            "ConditionExpression": "attribute_exists(pk)",
                        }
                    },
                ]
                with pytest.raises(ClientError, match="TransactionCanceled"):
                    ddb.transact_write_items(TransactItems=with_failure)
            else:
                ddb.put_item(TableName=table, Item={"pk": {"S": f"ack#{run}#{i}#{round_}"}})
        return None

    run_together(THREADS, write_or_fail)
    acknowledged = [f"ack#{run}#{i}#{r}" for i in range(0, THREADS, 2) for r in range(8)]
    found = ddb.batch_get_item(
        RequestItems={
            table: {"Keys": [{"pk": {"S": pk}} for pk in acknowledged[:100]], "ConsistentRead": True}
        }
    )["Responses"][table]
    found += ddb.batch_get_item(
        RequestItems={
            table: {"Keys": [{"pk": {"S": pk}} for pk in acknowledged[100:]], "ConsistentRead": True}
        }
    )["Responses"][table]
    assert sorted(item["pk"]["S"] for item in found) == sorted(acknowledged)
    for i in range(1, THREADS, 2):  # and no failed transaction left half of itself behind
        leftover = ddb.get_item(TableName=table, Key={"pk": {"S": f"tx#{run}#{i}#0"}}, ConsistentRead=True)
        assert "Item" not in leftover


def test_a_transaction_applies_all_or_nothing(stack: StackDescription) -> None:
    ddb, table = client("dynamodb", stack), stack.refs["SystemTable"]
    run = uuid.uuid4().hex
    first, second, third = ({"pk": {"S": f"all#{run}#{n}"}} for n in (1, 2, 3))
    ddb.put_item(TableName=table, Item={**second, "n": {"S": "not a number"}, "v": {"N": "1"}})

    def transact(*items: Any) -> None:
        ddb.transact_write_items(TransactItems=list(items))

    put_first = {"Put": {"TableName": table, "Item": {**first, "v": {"N": "1"}}}}
    with pytest.raises(ClientError) as refused:  # a condition fails: nothing is written
        transact(
            put_first,
            {
                "Update": {
                    "TableName": table,
                    "Key": second,
                    "UpdateExpression": "SET v = :two",
                    "ConditionExpression": "v = :zero",
                    "ExpressionAttributeValues": {":two": {"N": "2"}, ":zero": {"N": "0"}},
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )
    reasons = refused.value.response["CancellationReasons"]  # type: ignore[typeddict-item]
    assert [r["Code"] for r in reasons] == ["None", "ConditionalCheckFailed"]
    assert reasons[1]["Item"]["v"] == {"N": "1"}
    assert "Item" not in ddb.get_item(TableName=table, Key=first, ConsistentRead=True)
    with pytest.raises(ClientError):  # an update that cannot run on the stored value: nothing is written
        transact(
            put_first,
            {
                "Update": {
                    "TableName": table,
                    "Key": second,
                    "UpdateExpression": "SET n = n + :one",
                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                }
            },
        )
    assert "Item" not in ddb.get_item(TableName=table, Key=first, ConsistentRead=True)
    assert ddb.get_item(TableName=table, Key=second, ConsistentRead=True)["Item"]["v"] == {"N": "1"}
    transact(  # every condition holds: everything is written
        put_first,
        {
            "Update": {
                "TableName": table,
                "Key": second,
                "UpdateExpression": "SET v = v + :one",
                "ConditionExpression": "v = :one",
                "ExpressionAttributeValues": {":one": {"N": "1"}},
            }
        },
        {
            "ConditionCheck": {
                "TableName": table,
                "Key": third,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        },
    )
    assert ddb.get_item(TableName=table, Key=first, ConsistentRead=True)["Item"]["v"] == {"N": "1"}
    assert ddb.get_item(TableName=table, Key=second, ConsistentRead=True)["Item"]["v"] == {"N": "2"}
