"""DynamoDB request units per call, computed from the sizes of the items each call touches.

moto answers ``ReturnConsumedCapacity`` with a constant (1.0 per write, 0.5 per read, whatever the
item's size), so the local stack cannot report what DynamoDB would bill. This meter wraps botocore's
one call path in a process (as ``spool.devstack.instrument.AwsCallCounter`` does) and, for every
DynamoDB call, works out the request units AWS bills for it from the items' sizes, using DynamoDB's
published rules:

- an item's size is the UTF-8 length of its attribute names plus its values (strings: UTF-8 bytes;
  numbers: 1 byte per two significant digits + 1; binary: bytes; booleans and null: 1; lists and
  maps: 3 bytes + their elements + 1 byte per element; sets: their elements);
- a write is 1 write unit per 1 KB of the larger of the item before and after it (at least 1),
  twice that in a transaction, and a write to each global secondary index whose projection changed
  (not doubled in a transaction: the index is updated after it, as outside one; measured against
  DynamoDB by the dynoxide emulator's maintainers, nubo-db/dynoxide#188, 2026-08-14);
  a condition that fails still costs the write;
- a read is 1 read unit per 4 KB (an item, or the sum of the items a query returns), half that when
  eventually consistent, twice that in a transaction; a projection does not make it cheaper.

Sizes the call itself does not show (the item before an update, after it, before a delete) are read
with a strongly consistent ``GetItem`` on the unwrapped call path, so they are not counted as calls.

Installed in each container of the embedded stack when ``SPOOL_BENCH_CAPACITY`` names a directory
(``bench/hook/sitecustomize.py``, put on the fork server's ``PYTHONPATH`` by ``bench.cost``), it
meters while the file ``on`` exists in that directory and passes calls straight through otherwise; each
process writes ``<function>-<pid>.json``: ``{table: {"read": units, "write": units}}``, and
``{"_meter": {"shadow_seconds": s}}``, the time its own reads took.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

CAPACITY_ENV = "SPOOL_BENCH_CAPACITY"
# A file each metered call appends "function operation table kind units" to: what a figure is made of.
TRACE_ENV = "SPOOL_BENCH_CAPACITY_TRACE"
TYPE_TAGS = frozenset({"S", "N", "B", "SS", "NS", "BS", "M", "L", "NULL", "BOOL"})
METER_SWITCH = "on"  # the meter counts while this file exists in its directory (bench/cost.py)
METER_KEY = "_meter"  # the dump's entry for the meter's own time, beside the tables
WRITE_UNIT_BYTES = 1024
READ_UNIT_BYTES = 4096

METERED = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems", "GetItem", "BatchGetItem"}
    | {"Query", "Scan", "TransactGetItems"}
)

Item = Mapping[str, Any]  # an item as DynamoDB's wire format has it: {name: {"S": "..."}}


# ---------------------------------------------------------------------------------------- sizes
def number_size(text: str) -> int:
    """A number's stored size: 1 byte per two significant digits, plus 1."""
    digits = Decimal(text).normalize().as_tuple().digits
    significant = len(digits) if any(digits) else 1
    return math.ceil(significant / 2) + 1


def value_size(value: Mapping[str, Any]) -> int:
    """The size of one attribute value in wire format (``{"S": "abc"}``)."""
    ((tag, content),) = value.items()
    if tag == "S":
        return len(str(content).encode())
    if tag == "N":
        return number_size(str(content))
    if tag == "B":
        return len(_binary(content))
    if tag in ("BOOL", "NULL"):
        return 1
    if tag == "SS":
        return sum(len(str(s).encode()) for s in content)
    if tag == "NS":
        return sum(number_size(str(n)) for n in content)
    if tag == "BS":
        return sum(len(_binary(b)) for b in content)
    if tag == "L":
        return 3 + sum(value_size(v) + 1 for v in content)
    if tag == "M":
        return 3 + sum(len(k.encode()) + value_size(v) + 1 for k, v in content.items())
    raise ValueError(f"not a DynamoDB attribute value: {tag!r}")


def _binary(content: Any) -> bytes:
    if isinstance(content, bytes | bytearray):
        return bytes(content)
    return base64.b64decode(content)  # the JSON protocol's form


def item_size(item: Item | None) -> int:
    """An item's size as DynamoDB bills it: attribute names plus values. ``None`` (no item) is 0."""
    if not item:
        return 0
    return sum(len(name.encode()) + value_size(_wire(value)) for name, value in item.items())


def _wire(value: Any) -> Mapping[str, Any]:
    """A value in wire format; a plain Python value (a boto3 resource's) is serialized first."""
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in TYPE_TAGS:
        return value
    from boto3.dynamodb.types import TypeSerializer

    serialized: Mapping[str, Any] = TypeSerializer().serialize(value)
    return serialized


def write_units(size: int, *, transactional: bool = False) -> int:
    """Write request units for an item of ``size`` bytes (the larger of before and after)."""
    units = max(1, math.ceil(size / WRITE_UNIT_BYTES))
    return 2 * units if transactional else units


def read_units(size: int, *, consistent: bool, transactional: bool = False) -> float:
    """Read request units for ``size`` bytes read in one request (an item, or a query's page)."""
    units = max(1, math.ceil(size / READ_UNIT_BYTES))
    if transactional:
        return 2.0 * units
    return float(units) if consistent else units / 2


# ---------------------------------------------------------------------------------------- tables
class TableShape:
    """What the unit arithmetic needs of a table: its key attributes and its global indexes."""

    def __init__(self, description: Mapping[str, Any]) -> None:
        self.key = [k["AttributeName"] for k in description.get("KeySchema", [])]
        self.indexes: list[tuple[list[str], str, list[str]]] = [
            (
                [k["AttributeName"] for k in index["KeySchema"]],
                index.get("Projection", {}).get("ProjectionType", "ALL"),
                list(index.get("Projection", {}).get("NonKeyAttributes", [])),
            )
            for index in description.get("GlobalSecondaryIndexes", [])
        ]

    def key_of(self, item: Item) -> dict[str, Any]:
        return {name: item[name] for name in self.key if name in item}

    def index_write_units(self, before: Item | None, after: Item | None) -> int:
        """Writes to the global indexes: a put where the projected item changed, a delete where the
        item leaves the index or its index key changed."""
        units = 0
        for keys, projection, extra in self.indexes:
            old = self._projected(before, keys, projection, extra)
            new = self._projected(after, keys, projection, extra)
            if new is not None and new != old:
                units += write_units(item_size(new))
            if old is not None and (new is None or any(old.get(k) != new.get(k) for k in keys)):
                units += write_units(item_size(old))
        return units

    def _projected(
        self, item: Item | None, keys: list[str], projection: str, extra: list[str]
    ) -> Item | None:
        if not item or any(k not in item for k in keys):
            return None  # a sparse index holds only items with every index key attribute
        if projection == "ALL":
            return item
        names = set(self.key) | set(keys) | (set(extra) if projection == "INCLUDE" else set())
        return {k: v for k, v in item.items() if k in names}


# ---------------------------------------------------------------------------------------- the meter
Call = Callable[[Any, str, dict[str, Any]], Any]


class CapacityMeter:
    """Request units per table for every DynamoDB call this process makes (see the module's doc)."""

    def __init__(self, dump_to: Path | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.units: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._dump_to = dump_to
        self._lock = threading.Lock()
        self._shapes: dict[str, TableShape] = {}
        self._original: Call | None = None
        self._operation = ""  # the call being metered (for the trace)

    def install(self) -> CapacityMeter:
        import botocore.client

        client_class: Any = botocore.client.BaseClient
        original: Call = client_class._make_api_call
        self._original = original
        meter = self

        def metered(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
            if client.meta.service_model.service_name != "dynamodb":
                return original(client, operation_name, api_params)
            return meter.call(client, operation_name, api_params)

        client_class._make_api_call = metered
        return self

    # -------------------------------------------------------------- accounting
    def record(self, table: str, kind: str, units: float) -> None:
        trace = os.environ.get(TRACE_ENV)
        if trace and table != METER_KEY:
            with open(trace, "a") as out:  # one line per call, to find what a figure is made of
                name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "process")
                out.write(f"{name} {self._operation} {table} {kind} {units}\n")
        with self._lock:
            self._before_record()
            self.units[table][kind] += units
            if self._dump_to is not None:
                self._dump_to.write_text(json.dumps(self.units))

    def _before_record(self) -> None:
        return None

    def enabled(self) -> bool:
        return True

    def call(self, client: Any, operation: str, params: dict[str, Any]) -> Any:
        """Make the call and record what it costs (also when a condition fails)."""
        if not self.enabled():
            return self._raw(client, operation, params)
        self._operation = operation
        handler = getattr(self, f"_{_snake(operation)}", None) if operation in METERED else None
        if handler is None:
            return self._raw(client, operation, params)
        result: Any = handler(client, params)
        return result

    def _raw(self, client: Any, operation: str, params: dict[str, Any]) -> Any:
        assert self._original is not None
        return self._original(client, operation, params)

    def _shadow(self, client: Any, operation: str, params: dict[str, Any]) -> Any:
        """A read the meter makes for itself: not a call of the application, and its time is recorded
        (``_meter.shadow_seconds``) so the benchmark can take it out of the function's duration."""
        started = self._clock()
        try:
            return self._raw(client, operation, params)
        finally:
            self.record(METER_KEY, "shadow_seconds", self._clock() - started)

    def _shape(self, client: Any, table: str) -> TableShape:
        if table not in self._shapes:
            description = self._shadow(client, "DescribeTable", {"TableName": table})["Table"]
            self._shapes[table] = TableShape(description)
        return self._shapes[table]

    def _current(self, client: Any, table: str, key: Item) -> Item | None:
        answer = self._shadow(
            client, "GetItem", {"TableName": table, "Key": dict(key), "ConsistentRead": True}
        )
        item: Item | None = answer.get("Item")
        return item

    def _write(self, client: Any, table: str, before: Item | None, after: Item | None, *, tx: bool) -> None:
        size = max(item_size(before), item_size(after))
        self.record(table, "write", write_units(size, transactional=tx))
        index = self._shape(client, table).index_write_units(before, after)
        if index:
            self.record(table, "write", index)

    # -------------------------------------------------------------- writes
    def _put_item(self, client: Any, params: dict[str, Any]) -> Any:
        table, item = params["TableName"], params["Item"]
        before = self._current(client, table, self._shape(client, table).key_of(item))
        try:
            result = self._raw(client, "PutItem", params)
        except Exception:
            self._write(client, table, before, None, tx=False)  # a failed condition is billed
            raise
        self._write(client, table, before, item, tx=False)
        return result

    def _update_item(self, client: Any, params: dict[str, Any]) -> Any:
        table, key = params["TableName"], params["Key"]
        before = self._current(client, table, key)
        try:
            result = self._raw(client, "UpdateItem", params)
        except Exception:
            self._write(client, table, before, None, tx=False)
            raise
        self._write(client, table, before, self._current(client, table, key), tx=False)
        return result

    def _delete_item(self, client: Any, params: dict[str, Any]) -> Any:
        table = params["TableName"]
        before = self._current(client, table, params["Key"])
        try:
            return self._raw(client, "DeleteItem", params)
        finally:
            self._write(client, table, before, None, tx=False)

    def _batch_write_item(self, client: Any, params: dict[str, Any]) -> Any:
        befores: list[tuple[str, Item | None, Item | None]] = []
        for table, requests in params["RequestItems"].items():
            shape = self._shape(client, table)
            for request in requests:
                if "PutRequest" in request:
                    item = request["PutRequest"]["Item"]
                    befores.append((table, self._current(client, table, shape.key_of(item)), item))
                else:
                    befores.append(
                        (table, self._current(client, table, request["DeleteRequest"]["Key"]), None)
                    )
        result = self._raw(client, "BatchWriteItem", params)
        for table, before, after in befores:
            self._write(client, table, before, after, tx=False)
        return result

    def _transact_write_items(self, client: Any, params: dict[str, Any]) -> Any:
        actions: list[tuple[str, str, dict[str, Any], Item | None]] = []
        for entry in params["TransactItems"]:
            ((kind, action),) = entry.items()
            table = action["TableName"]
            key = action["Key"] if "Key" in action else self._shape(client, table).key_of(action["Item"])
            actions.append((kind, table, key, self._current(client, table, key)))
        try:
            result = self._raw(client, "TransactWriteItems", params)
        except Exception:
            for _, table, _, before in actions:  # a cancelled transaction is billed for what it read
                self._write(client, table, before, None, tx=True)
            raise
        for (kind, table, key, before), entry in zip(actions, params["TransactItems"], strict=True):
            if kind == "Put":
                after: Item | None = entry["Put"]["Item"]
            elif kind == "Update":
                after = self._current(client, table, key)
            elif kind == "Delete":
                after = None
            else:  # ConditionCheck: a write unit per KB of the item checked, no index write
                self.record(table, "write", write_units(item_size(before), transactional=True))
                continue
            self._write(client, table, before, after, tx=True)
        return result

    # -------------------------------------------------------------- reads
    def _get_item(self, client: Any, params: dict[str, Any]) -> Any:
        result = self._raw(client, "GetItem", params)
        item = result.get("Item")
        if item is not None and "ProjectionExpression" in params:  # billed for the whole item
            item = self._current(client, params["TableName"], params["Key"])
        consistent = bool(params.get("ConsistentRead"))
        self.record(params["TableName"], "read", read_units(item_size(item), consistent=consistent))
        return result

    def _batch_get_item(self, client: Any, params: dict[str, Any]) -> Any:
        result = self._raw(client, "BatchGetItem", params)
        for table, items in result.get("Responses", {}).items():
            consistent = bool(params["RequestItems"].get(table, {}).get("ConsistentRead"))
            for item in items:
                self.record(table, "read", read_units(item_size(item), consistent=consistent))
        return result

    def _query(self, client: Any, params: dict[str, Any]) -> Any:
        return self._page(client, "Query", params)

    def _scan(self, client: Any, params: dict[str, Any]) -> Any:
        return self._page(client, "Scan", params)

    def _page(self, client: Any, operation: str, params: dict[str, Any]) -> Any:
        """One page: the items' sizes summed, then rounded up to 4 KB (the items a filter dropped are
        billed too, but their sizes are not returned: a filtered page is undercounted)."""
        result = self._raw(client, operation, params)
        size = sum(item_size(item) for item in result.get("Items", []))
        consistent = bool(params.get("ConsistentRead"))
        self.record(params["TableName"], "read", read_units(size, consistent=consistent))
        return result

    def _transact_get_items(self, client: Any, params: dict[str, Any]) -> Any:
        result = self._raw(client, "TransactGetItems", params)
        for entry, answer in zip(params["TransactItems"], result.get("Responses", []), strict=False):
            table = entry["Get"]["TableName"]
            size = item_size((answer or {}).get("Item"))  # a missing item: null on AWS, {} on moto
            self.record(table, "read", read_units(size, consistent=True, transactional=True))
        return result


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


def install_from_environment() -> CapacityMeter | None:
    """Install the meter when ``SPOOL_BENCH_CAPACITY`` names a directory (read at each call's dump,
    as a container learns its function's name after the fork)."""
    directory = os.environ.get(CAPACITY_ENV)
    if not directory:
        return None
    return _DeferredMeter(Path(directory)).install()


class _DeferredMeter(CapacityMeter):
    """Installed in the fork server before any container exists: each container names its own file
    from its function's name and pid at its first DynamoDB call."""

    def __init__(self, directory: Path) -> None:
        super().__init__(None)
        self._directory = directory
        self._pid = 0

    def enabled(self) -> bool:
        return (self._directory / METER_SWITCH).exists()

    def _before_record(self) -> None:
        if self._pid != os.getpid():  # a fresh container (forked): its own counts and file
            self._pid = os.getpid()
            self.units.clear()
            name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "process")
            self._dump_to = self._directory / f"{name}-{self._pid}.json"


def read_dumps(directory: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{file stem: {table: {"read": units, "write": units}}}`` from a directory of dumps."""
    dumps = {}
    for path in sorted(directory.glob("*.json")):
        text = path.read_text()
        dumps[path.stem] = json.loads(text) if text else {}
    return dumps
