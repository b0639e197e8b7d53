"""Where moto's DynamoDB departs from AWS in a way the local stack cannot live with, and the fix.

``TransactWriteItems``: moto takes a deep copy of every table a transaction names before applying
it, so it can put the copy back if an operation fails. The copy includes every item and every stream
record the table ever had: a transaction's cost grows with the table (it is most of moto's CPU once a
few thousand jobs exist), and the rollback would erase writes made meanwhile by other requests.
DynamoDB itself evaluates every condition against the state before the transaction and applies
all operations or none. This does the same: a first pass checks each operation (validation and
condition) without writing; a second applies them. Only the items the transaction touches are
copied, so an operation that still fails to apply (an update expression that cannot run on the
stored value, say) is undone item by item, stream records included. It relies on the server
running one DynamoDB request at a time (``moto_server.SerializedDynamoDB``).
"""

from __future__ import annotations

import copy
from typing import Any


def install() -> None:
    from moto.dynamodb.models import DynamoDBBackend

    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]


def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
    from moto.dynamodb.comparisons import get_filter_expression
    from moto.dynamodb.exceptions import (
        ConditionalCheckFailed,
        MockValidationException,
        MultipleTransactionsException,
        TooManyTransactionsException,
        TransactionCanceledException,
        TransactWriteSingleOpException,
    )

    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    targets: set[tuple[str, str]] = set()
    errors: list[tuple[str | None, str | None, dict[str, Any] | None]] = []
    planned: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for entry in transact_items:
        if len(entry) > 1:
            raise TransactWriteSingleOpException
        failed_item: dict[str, Any] | None = None
        try:
            op_type, op = next(iter(entry.items()))
            if op_type not in {"ConditionCheck", "Put", "Delete", "Update"}:
                raise ValueError("Unsupported transaction operation")
            table = self.get_table(op["TableName"])
            if op_type == "Put":
                key = {table.hash_key_attr: op["Item"][table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = op["Item"][table.range_key_attr]
            else:
                key = op["Key"]
            target = (str(op["TableName"]), str(dict(sorted(key.items()))))
            if target in targets:
                raise MultipleTransactionsException()
            targets.add(target)
            current = self.get_item(op["TableName"], key)
            if op.get("ConditionExpression") is not None:
                condition = get_filter_expression(
                    op["ConditionExpression"],
                    op.get("ExpressionAttributeNames"),
                    op.get("ExpressionAttributeValues"),
                )
                if not condition.expr(current):
                    if op.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD" and current:
                        failed_item = current.to_json()["Attributes"]
                    raise ConditionalCheckFailed(item=failed_item)
            planned.append((op_type, op, key))
            errors.append((None, None, None))
        except (MultipleTransactionsException, MockValidationException):
            raise
        except ConditionalCheckFailed as exc:
            errors.append(("ConditionalCheckFailed", str(exc.message), failed_item))
        except Exception as exc:
            errors.append((type(exc).__name__, str(exc), failed_item))
    if any(code is not None for code, _, _ in errors):
        raise TransactionCanceledException(errors)
    _apply(self, planned)


def _apply(backend: Any, planned: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    """Apply the checked operations; if one fails, undo those applied before it."""
    undo: list[tuple[Any, Any, Any, Any]] = []
    stream_marks: dict[int, tuple[Any, int]] = {}
    try:
        for op_type, op, key in planned:
            table = backend.get_table(op["TableName"])
            if table.stream_shard is not None and id(table) not in stream_marks:
                stream_marks[id(table)] = (table.stream_shard, len(table.stream_shard.items))
            hash_key, range_key = backend.get_keys_value(table, key)
            undo.append((table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))))
            names, values = op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
            if op_type == "Put":
                backend.put_item(op["TableName"], op["Item"], expression_attribute_names=names)
            elif op_type == "Delete":
                backend.delete_item(op["TableName"], key, names, values)
            elif op_type == "Update":
                backend.update_item(op["TableName"], key, op["UpdateExpression"], names, values)
    except BaseException:
        for table, hash_key, range_key, previous in reversed(undo):
            partition = table.items[hash_key] if range_key is not None else table.items
            slot = range_key if range_key is not None else hash_key
            if previous is None:
                partition.pop(slot, None)
            else:
                partition[slot] = previous
        for shard, length in stream_marks.values():
            del shard.items[length:]
        raise
