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

``Query``: moto sorts every item of the table (``Table.all_items``) and then keeps those of the
queried partition, so a query cost 4.5 ms on an empty chunks table, 126 ms at 10,000 items and grew
on (``make bench`` prints the figures). DynamoDB reads one partition. Here a query of the table hands
moto only the partition's items, through the same code path (same ordering,
``Limit``, ``ExclusiveStartKey``, filters and projections): its cost no longer depends on the
table's size. A query of a global secondary index gets the items that carry the index's hash key
value, unsorted (moto sorts the candidates by the index's keys itself): still a pass over the table,
but without the sort of every item that dominated it.

Responses: moto serializes a DynamoDB answer by walking the API model member by member, ten members
per attribute value, which cost ~0.5 ms per item returned (a page of 100 chunks took 60 ms, most of
a query). An attribute value moto already holds in its wire form (strings, numbers, booleans, null,
string and number sets, lists and maps of those) is written as it is; binary values still go
through moto's serializer. The output is the same JSON (a test compares both).

Parsing: moto parses an ``UpdateExpression`` and lexes a ``ConditionExpression`` from scratch on every
request (twice per ``UpdateItem``: once to validate the request, once to apply it), and lists its
handler's methods with ``inspect.getmembers`` on every request to check the action exists. Spool
sends the same few dozen expression strings over and over with different values, so the parsed
update expression (moto's validator works on a deep copy of it, never on it) and the condition's
tokens (values and names are substituted after lexing) are kept per expression string, and the
method list per class: a conditional ``UpdateItem`` cost 2.7 ms of moto's CPU and costs 1.9 ms; a
``GetItem`` 0.64 ms and 0.57 ms. Expressions that fail to parse are not kept (each request raises
moto's own error, as before).

Validation: moto checks an update expression on every request with ten passes over (a deep copy of)
its tree. Three of them look at nothing but the expression, its attribute names and the table's key
(one ``SET`` per clause kind, no two actions on one path, no key attribute updated), and the first of
them walks the whole tree again at every node: for the 12-action ``SET`` that ends a job they were a
fifth of the settlement transaction, which holds the server's DynamoDB lock while every other request
waits. Those three are skipped for an expression, names and key that passed every pass before (only a
success is kept: a failing request fails as it did); the seven that read the values and the item run
every time. Timed in one process (moto and its boto3 client), the settlement transaction (three
updates and a put) took 9.6-10.4 ms and takes 7.8-8.2 ms; the fanout's claim (a conditional
``UpdateItem``) took 2.8-2.9 ms and takes 2.5 ms.
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

# The items ``Table.all_items`` returns for the query running in this context: (table, items).
_query_scope: ContextVar[tuple[Any, list[Any]] | None] = ContextVar("query_scope", default=None)


def install(on_stream_record: Callable[[str], None] | None = None) -> None:
    """Install the patches; ``on_stream_record(table_name)`` runs after each DynamoDB stream record."""
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.table import StreamShard, Table

    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    _install_attribute_value_serializer()
    _install_parse_caches()
    _install_validation_cache()
    if on_stream_record is not None:
        add = getattr(StreamShard.add, "_spool_original", StreamShard.add)

        def add_and_notify(self: Any, old: Any, new: Any) -> None:
            add(self, old, new)
            on_stream_record(str(self.table.name))

        add_and_notify._spool_original = add  # type: ignore[attr-defined]
        StreamShard.add = add_and_notify  # type: ignore[method-assign]
    if not getattr(Table.query, "_spool_scoped", False):
        Table.all_items = _scoped_all_items(Table.all_items)  # type: ignore[method-assign, assignment]
        Table.query = _partition_query(Table.query)  # type: ignore[method-assign]


PARSED_EXPRESSIONS = 1024  # distinct expression strings kept (Spool uses a few dozen)


def _install_parse_caches() -> None:
    import moto.core.responses
    import moto.dynamodb.parsing.expressions
    from moto.dynamodb.comparisons import ConditionExpressionParser

    responses: Any = moto.core.responses  # moto's modules declare no exports
    parser: Any = moto.dynamodb.parsing.expressions.UpdateExpressionParser  # type: ignore[attr-defined]
    if getattr(parser.make, "_spool_cached", False):
        return
    make = parser.make.__func__
    parsed = functools.lru_cache(maxsize=PARSED_EXPRESSIONS)(functools.partial(make, parser))

    def cached_make(cls: Any, expression: str) -> Any:
        return parsed(expression) if cls is parser else make(cls, expression)

    cached_make._spool_cached = True  # type: ignore[attr-defined]
    parser.make = classmethod(cached_make)

    lex = ConditionExpressionParser._lex_condition_expression

    @functools.lru_cache(maxsize=PARSED_EXPRESSIONS)
    def tokens(expression: str) -> tuple[Any, ...]:
        return tuple(lex(ConditionExpressionParser(expression, None, None)))

    def cached_lex(self: Any) -> deque[Any]:
        return deque(tokens(self.condition_expression))

    ConditionExpressionParser._lex_condition_expression = cached_lex  # type: ignore[method-assign]
    responses.method_names_from_class = functools.lru_cache(maxsize=None)(responses.method_names_from_class)


VALIDATED_EXPRESSIONS = 4096  # (expression, names, key) combinations that passed, kept at most


def _install_validation_cache() -> None:
    from moto.dynamodb.parsing import validators

    validator: Any = validators.UpdateExpressionValidator
    if getattr(validator.validate, "_spool_cached", False):
        return
    static = (
        validators.ActionCountValidator,
        validators.OverlappingPathsValidator,
        validators.UpdateHashRangeKeyValidator,
    )
    # Keyed by the parsed expression's identity (the parse cache hands out one tree per string); the
    # value holds the tree, so no other object can take its identity while the key is kept.
    passed: dict[tuple[int, tuple[tuple[str, str], ...], tuple[str, ...]], Any] = {}
    init, validate = validator.__init__, validator.validate

    def remembering_init(self: Any, expression: Any, *args: Any, **kwargs: Any) -> None:
        init(self, expression, *args, **kwargs)
        names = tuple(sorted((self.expression_attribute_names or {}).items()))
        self._spool_passed = (id(expression), names, tuple(self.table.table_key_attrs)), expression
        if self._spool_passed[0] in passed:
            self.processors = [p for p in self.processors if not isinstance(p, static)]

    def remembering_validate(self: Any) -> Any:
        validated = validate(self)  # raises moto's own error when the expression does not pass
        key, expression = self._spool_passed
        if key not in passed:
            if len(passed) >= VALIDATED_EXPRESSIONS:
                passed.clear()
            passed[key] = expression
        return validated

    remembering_validate._spool_cached = True  # type: ignore[attr-defined]
    validator.__init__ = remembering_init
    validator.validate = remembering_validate


def _install_attribute_value_serializer() -> None:
    from moto.core.serialize import BaseJSONSerializer

    serialize = BaseJSONSerializer._serialize_type_structure
    if getattr(serialize, "_spool_wire", False):
        return

    def serialize_structure(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        if key and shape.name == "AttributeValue" and is_wire_attribute_value(value):
            self._default_serialize(serialized, value, shape, key)
            return
        serialize(self, serialized, value, shape, key)

    serialize_structure._spool_wire = True  # type: ignore[attr-defined]
    BaseJSONSerializer._serialize_type_structure = serialize_structure  # type: ignore[method-assign]


def is_wire_attribute_value(value: Any) -> bool:
    """Whether ``value`` is a DynamoDB attribute value already in its JSON wire form (no binary)."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((kind, inner),) = value.items()
    if kind in ("S", "N"):
        return isinstance(inner, str)
    if kind in ("BOOL", "NULL"):
        return isinstance(inner, bool)
    if kind in ("SS", "NS"):
        return isinstance(inner, list) and all(isinstance(member, str) for member in inner)
    if kind == "M":
        return isinstance(inner, dict) and all(
            isinstance(name, str) and is_wire_attribute_value(member) for name, member in inner.items()
        )
    if kind == "L":
        return isinstance(inner, list) and all(is_wire_attribute_value(member) for member in inner)
    return False


def _scoped_all_items(all_items: Callable[[Any], list[Any]]) -> Callable[[Any], list[Any]]:
    @functools.wraps(all_items)
    def scoped(self: Any) -> list[Any]:
        scope = _query_scope.get()
        if scope is not None and scope[0] is self:
            return scope[1]
        return all_items(self)

    return scoped


def _partition_query(query: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(query)
    def partition_query(self: Any, hash_key: Any, *args: Any, **kwargs: Any) -> Any:
        # moto's backend passes index_name positionally (the 7th argument after the hash key).
        index_name = kwargs.get("index_name", args[6] if len(args) > 6 else None)
        token = _query_scope.set((self, query_candidates(self, hash_key, index_name, kwargs)))
        try:
            return query(self, hash_key, *args, **kwargs)
        finally:
            _query_scope.reset(token)

    partition_query._spool_scoped = True  # type: ignore[attr-defined]
    return partition_query


def query_candidates(table: Any, hash_key: Any, index_name: str | None, kwargs: dict[str, Any]) -> list[Any]:
    """The items a query may return (moto filters and sorts them as it does the table's)."""
    if not index_name:
        partition = table.items.get(hash_key) if hash_key is not None else None
        if partition is None:
            return []
        if not table.range_key_attr:
            return [partition]
        return list(partition.values())
    # An index: the items whose attributes carry every hash key condition's value (moto checks them
    # again, validates the index and sorts the candidates by the index's keys).
    conditions = list(kwargs.get("hash_key_conditions") or [])
    items = (
        item
        for values in table.items.values()
        for item in (values.values() if table.range_key_attr else [values])
    )
    return [item for item in items if all(_equal(item.attrs.get(name), value) for name, value in conditions)]


def _equal(stored: Any, value: Any) -> bool:
    return stored is not None and bool(stored == value)


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
