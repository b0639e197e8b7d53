"""The stack's moto server: kept-alive connections, queries and answers exactly as unpatched moto gives
them (the server answers a query from the partition alone and writes attribute values as they are),
and the count of stream records written that the stream pollers wait on."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from spool.devstack.moto_patches import is_wire_attribute_value
from spool.devstack.provision import MotoServer, StackDescription
from spool.devstack.runtime import InvocationError
from spool.devstack.streams import StreamChanges, StreamPoller
from tests.integration.conftest import client
from tests.support import wait_for

TABLE = {
    "BillingMode": "PAY_PER_REQUEST",
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "N"},
        {"AttributeName": "owner", "AttributeType": "S"},
        {"AttributeName": "rank", "AttributeType": "N"},
    ],
    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": "ByOwner",
            "KeySchema": [
                {"AttributeName": "owner", "KeyType": "HASH"},
                {"AttributeName": "rank", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            "IndexName": "OwnerOnly",
            "KeySchema": [{"AttributeName": "owner", "KeyType": "HASH"}],
            "Projection": {"ProjectionType": "KEYS_ONLY"},
        },
    ],
    "StreamSpecification": {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
}


def items() -> list[dict[str, Any]]:
    """Items over several partitions, some without the index's keys, with every attribute type."""
    rows = []
    for p in range(4):
        for s in range(12):
            item: dict[str, Any] = {
                "pk": {"S": f"part#{p}"},
                "sk": {"N": str(s * 3 - 5)},
                "text": {"S": f"chunk {p}.{s}"},
                "n": {"N": str(s % 4)},
                "flags": {
                    "M": {"on": {"BOOL": s % 2 == 0}, "none": {"NULL": True}, "l": {"L": [{"N": "1"}]}}
                },
                "tags": {"SS": ["a", f"t{s}"]},
                "nums": {"NS": ["1", str(s + 2)]},
                "empty": {"S": ""},
            }
            if s % 3:
                item["owner"] = {"S": f"owner-{(p + s) % 2}"}
                item["rank"] = {"N": str((s * 7) % 5)}
            if s == 4:
                item["blob"] = {"B": b"\x00\x01bytes"}
                item["blobs"] = {"BS": [b"x", b"y"]}
            rows.append(item)
    return rows


QUERIES: list[dict[str, Any]] = [
    {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "part#1"}}},
    {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "part#9"}}},
    {
        "KeyConditionExpression": "pk = :p AND sk > :s",
        "ExpressionAttributeValues": {":p": {"S": "part#2"}, ":s": {"N": "4"}},
        "ScanIndexForward": False,
    },
    {
        "KeyConditionExpression": "pk = :p AND sk BETWEEN :a AND :b",
        "ExpressionAttributeValues": {":p": {"S": "part#0"}, ":a": {"N": "-2"}, ":b": {"N": "20"}},
        "Limit": 3,
    },
    {
        "KeyConditionExpression": "pk = :p",
        "FilterExpression": "n = :n OR attribute_exists(#b)",
        "ExpressionAttributeValues": {":p": {"S": "part#3"}, ":n": {"N": "2"}},
        "ProjectionExpression": "pk, sk, #t, flags.l",
        "ExpressionAttributeNames": {"#t": "text", "#b": "blob"},
    },
    {
        "IndexName": "ByOwner",
        "KeyConditionExpression": "#o = :o AND #r >= :r",
        "ExpressionAttributeNames": {"#o": "owner", "#r": "rank"},
        "ExpressionAttributeValues": {":o": {"S": "owner-1"}, ":r": {"N": "1"}},
        "Limit": 4,
    },
    {
        "IndexName": "ByOwner",
        "KeyConditionExpression": "#o = :o",
        "ExpressionAttributeNames": {"#o": "owner"},
        "ExpressionAttributeValues": {":o": {"S": "owner-0"}, ":n": {"N": "3"}},
        "ScanIndexForward": False,
        "FilterExpression": "n < :n",
        "Limit": 5,
    },
    {
        "IndexName": "OwnerOnly",
        "KeyConditionExpression": "#o = :o",
        "ExpressionAttributeNames": {"#o": "owner"},
        "ExpressionAttributeValues": {":o": {"S": "owner-1"}},
    },
]


EXPECTED_COUNTS = [12, 0, 8, 8, 4, 12, 12, 16]  # items each query returns, over all its pages


def query_pages(ddb: Any, table: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    """Every page of a query (following LastEvaluatedKey), without the request metadata."""
    pages, start = [], None
    while True:
        page = ddb.query(TableName=table, **query, **({"ExclusiveStartKey": start} if start else {}))
        page.pop("ResponseMetadata", None)
        pages.append(page)
        start = page.get("LastEvaluatedKey")
        if not start:
            return pages


def load(ddb: Any, table: str) -> None:
    ddb.create_table(TableName=table, **TABLE)
    for item in items():
        ddb.put_item(TableName=table, Item=item)


@pytest.fixture(scope="module")
def unpatched() -> Iterator[Any]:
    """moto in this process, as it comes (the patches run in the server's process only)."""
    with mock_aws():
        ddb = boto3.client(
            "dynamodb", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        load(ddb, "reference")
        yield ddb


def test_queries_return_what_unpatched_moto_returns(stack: StackDescription, unpatched: Any) -> None:
    ddb, table = client("dynamodb", stack), f"query-{uuid.uuid4().hex[:8]}"
    load(ddb, table)
    try:
        for query, expected in zip(QUERIES, EXPECTED_COUNTS, strict=True):
            pages = query_pages(ddb, table, query)
            assert pages == query_pages(unpatched, "reference", query), query
            assert sum(len(page["Items"]) for page in pages) == expected, query  # equal, and not both empty
        key = {"pk": {"S": "part#1"}, "sk": {"N": "7"}}
        served = ddb.get_item(TableName=table, Key=key)
        reference = unpatched.get_item(TableName="reference", Key=key)
        assert served["Item"] == reference["Item"]
        scanned = ddb.scan(TableName=table, Limit=7)["Items"]
        assert scanned == unpatched.scan(TableName="reference", Limit=7)["Items"]
    finally:
        ddb.delete_table(TableName=table)


def test_attribute_values_in_wire_form_are_recognized() -> None:
    assert is_wire_attribute_value({"M": {"a": {"L": [{"S": "x"}, {"NULL": True}]}, "b": {"NS": ["1"]}}})
    assert not is_wire_attribute_value({"B": "AAE="})
    assert not is_wire_attribute_value({"M": {"a": {"BS": []}}})
    assert not is_wire_attribute_value({"S": "x", "N": "1"})
    assert not is_wire_attribute_value({"N": 1})
    assert not is_wire_attribute_value("x")


def test_connections_are_kept_alive(moto_server: MotoServer) -> None:
    """Two DynamoDB calls over one connection: the server neither closes it nor asks to."""
    host = urllib.parse.urlsplit(moto_server.url)
    connection = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=30)
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/dynamodb/aws4_request, "
        "SignedHeaders=host, Signature=x",
    }
    try:
        connection.request("POST", "/", body="{}", headers=headers)
        first = connection.getresponse()
        assert first.status == 200, first.read()
        assert "TableNames" in json.loads(first.read())
        assert (first.getheader("Connection") or "").lower() != "close"
        sock = connection.sock
        connection.request("POST", "/", body="{}", headers=headers)
        second = connection.getresponse()
        assert second.status == 200
        second.read()
        assert connection.sock is sock  # the same socket: nothing reconnected
    finally:
        connection.close()


def put_chunk(stack: StackDescription) -> str:
    """A chunk item of a new job, written to the chunk table (its stream records it); its key."""
    pk = f"t#job#{uuid.uuid4().hex}"
    client("dynamodb", stack).put_item(
        TableName=stack.refs["ChunksTable"], Item={"pk": {"S": pk}, "sequence_id": {"N": "0"}}
    )
    return pk


def answers_to_a_chunk_write(waiting: StreamChanges, after: int, stack: StackDescription) -> list[int]:
    """What ``waiting.wait(after)``, started on a thread, answers once a chunk is written."""
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(waiting.wait(after)))
    thread.start()
    put_chunk(stack)
    thread.join(timeout=60)
    return answers


def test_stream_changes_count_records_and_wait_for_the_next(stack: StackDescription) -> None:
    changes = StreamChanges(stack.endpoint_url, wait_seconds=0)
    before = changes.wait(-1)
    assert changes.wait(before + 10) == before  # nothing new: the answer comes at the timeout
    put_chunk(stack)
    assert changes.wait(before) > before

    waiting = StreamChanges(stack.endpoint_url, wait_seconds=30)
    now = waiting.wait(-1)
    answers = answers_to_a_chunk_write(waiting, now, stack)
    assert answers and answers[0] > now  # answered by the write, not the 30 s timeout


def test_stream_changes_of_one_table_are_not_woken_by_another(stack: StackDescription) -> None:
    """A job's writes (the jobs table) do not wake the chunk stream's poller, and the other way round."""
    chunks = StreamChanges(stack.endpoint_url, wait_seconds=0, table=stack.refs["ChunksTable"])
    jobs = StreamChanges(stack.endpoint_url, wait_seconds=0, table=stack.refs["JobsTable"])
    chunks_before, jobs_before = chunks.wait(-1), jobs.wait(-1)
    ddb = client("dynamodb", stack)
    ddb.put_item(
        TableName=stack.refs["JobsTable"],
        Item={"pk": {"S": f"t#job#{uuid.uuid4().hex}"}, "sk": {"S": "job"}},
    )
    assert jobs.wait(jobs_before) == jobs_before + 1
    assert chunks.wait(chunks_before) == chunks_before  # answered at its timeout, unchanged

    waiting = StreamChanges(stack.endpoint_url, wait_seconds=30, table=stack.refs["ChunksTable"])
    answers = answers_to_a_chunk_write(waiting, chunks_before, stack)
    assert answers == [chunks_before + 1]  # answered by the chunk write, not the 30 s timeout


def test_stream_changes_refuse_bad_parameters(moto_server: MotoServer) -> None:
    host = urllib.parse.urlsplit(moto_server.url)
    connection = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=30)
    try:
        connection.request("GET", "/_spool/stream-changes?after=x")
        response = connection.getresponse()
        assert response.status == 400
        assert b"integer" in response.read()
    finally:
        connection.close()
    with pytest.raises(OSError, match="stream changes"):
        StreamChanges("http://127.0.0.1:9", wait_seconds=0).wait(0)  # nothing listens on port 9


class Collector:
    def __init__(self) -> None:
        self.keys: list[str] = []

    def invoke(self, event: dict[str, Any]) -> Any:
        self.keys += [r["dynamodb"]["Keys"]["pk"]["S"] for r in event["Records"]]
        return None


def test_an_idle_poller_waits_for_a_write_and_delivers_it(stack: StackDescription) -> None:
    streams = client("dynamodbstreams", stack)
    function = Collector()
    poller = StreamPoller(
        streams,
        stack.attributes["ChunksTable.StreamArn"],
        function,  # type: ignore[arg-type]
        batch_size=100,
        region=stack.region,
        changes=StreamChanges(stack.endpoint_url, wait_seconds=0.5),
    )
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        # Idle: the poller reads the stream once at its start, then waits on the server.
        wait_for(lambda: poller.polls >= 1, timeout=60, what="the poller's first read")
        idle = StreamChanges(stack.endpoint_url, wait_seconds=1.5)
        polls, written = poller.polls, idle.wait(-1)
        idle.wait(written)  # up to 1.5 s, over which a 50 ms poller would have read 30 times
        # One read per write at most (nothing else writes here, but another test's leftovers might).
        assert poller.polls - polls <= idle.wait(-1) - written + 1
        pk = put_chunk(stack)
        wait_for(lambda: pk in function.keys, timeout=60, what="the record written after the idle time")
    finally:
        poller.stop()
        thread.join(timeout=10)


def test_a_poller_falls_back_to_polling_when_it_cannot_wait(stack: StackDescription) -> None:
    streams = client("dynamodbstreams", stack)
    function = Collector()
    poller = StreamPoller(
        streams,
        stack.attributes["ChunksTable.StreamArn"],
        function,  # type: ignore[arg-type]
        batch_size=100,
        region=stack.region,
        interval=0.01,
        idle_interval=0.2,
        changes=StreamChanges("http://127.0.0.1:9", wait_seconds=0),
    )
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        pk = put_chunk(stack)
        wait_for(lambda: pk in function.keys, timeout=60, what="the record, read by polling")
    finally:
        poller.stop()
        thread.join(timeout=10)


def test_a_failed_batch_is_retried(stack: StackDescription) -> None:
    streams = client("dynamodbstreams", stack)
    attempts: list[int] = []

    class Flaky(Collector):
        def invoke(self, event: dict[str, Any]) -> Any:
            attempts.append(len(event["Records"]))
            if len(attempts) == 1:
                raise InvocationError("the first try fails")
            return super().invoke(event)

    function = Flaky()
    poller = StreamPoller(
        streams,
        stack.attributes["ChunksTable.StreamArn"],
        function,  # type: ignore[arg-type]
        batch_size=100,
        region=stack.region,
        changes=StreamChanges(stack.endpoint_url, wait_seconds=0.5),
    )
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: poller.polls >= 1, timeout=60, what="the poller's first read")
        pk = put_chunk(stack)
        wait_for(lambda: pk in function.keys, timeout=60, what="the record, after a failed try")
        assert len(attempts) >= 2
    finally:
        poller.stop()
        thread.join(timeout=10)


# The same expression strings again and again with other names and values, as Spool sends them, and
# expressions that fail: the server keeps parsed expressions per string (moto_patches).
COUNT = "SET #c = if_not_exists(#c, :zero) + :one, #t = :t"
COUNT_BELOW = "attribute_not_exists(#c) OR #c < :max"
TAKE = "SET sender = :me, queue = list_append(if_not_exists(queue, :empty), :tag) REMOVE label"
TAKE_IF_FREE = "attribute_exists(pk) AND (attribute_not_exists(sender) OR sender = :me)"
MOVE = "REMOVE sender, queue[0] SET nested.deep = :x"


def count(names: dict[str, str], zero: str, one: str, text: str) -> dict[str, Any]:
    values = {":zero": {"N": zero}, ":one": {"N": one}, ":max": {"N": "2"}, ":t": {"S": text}}
    return {
        "UpdateExpression": COUNT,
        "ConditionExpression": COUNT_BELOW,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def take(sender: str, tag: str) -> dict[str, Any]:
    values = {":me": {"S": sender}, ":empty": {"L": []}, ":tag": {"L": [{"S": tag}]}}
    return {
        "UpdateExpression": TAKE,
        "ConditionExpression": TAKE_IF_FREE,
        "ExpressionAttributeValues": values,
    }


def plain(expression: str, **values: Any) -> dict[str, Any]:
    return {
        "UpdateExpression": expression,
        "ExpressionAttributeValues": {f":{k}": v for k, v in values.items()},
    }


def named(expression: str, names: dict[str, str]) -> dict[str, Any]:
    return {**plain(expression, x={"N": "1"}), "ExpressionAttributeNames": names}


# Checks of the expression alone are skipped for an expression, names and key that passed before:
# the same strings with names that make them fail must still fail.
TWO_PATHS = "SET #a = :x, #b = :x"
ONE_PATH = "SET #k = :x"
NAMES = {"#c": "count", "#t": "text"}
UPDATES: list[dict[str, Any]] = [
    count(NAMES, "0", "1", "a"),
    count(NAMES, "0", "5", "b"),
    count(NAMES, "0", "1", "c"),  # the same strings: the condition now fails (count is 6)
    count({"#c": "other", "#t": "label"}, "10", "1", "d"),  # the same strings naming other attributes
    take("w1", "x"),
    take("w2", "y"),  # another sender holds it
    plain("ADD wakes :one", one={"N": "1"}),
    plain("ADD wakes :one", one={"N": "2"}),
    plain("SET = :x", x={"N": "1"}),  # does not parse
    plain("SET = :x", x={"N": "1"}),  # nor the second time
    {**plain("SET a = :x", x={"N": "1"}), "ConditionExpression": "attribute_exists(pk) AND AND b = :x"},
    count({"#c": "count"}, "0", "1", "a"),  # a name the expression uses is missing: moto's own answer
    plain(MOVE, x={"S": "v"}),
    plain("SET nested = :m", m={"M": {"deep": {"S": "v"}}}),
    plain(MOVE, x={"S": "w"}),
    named(TWO_PATHS, {"#a": "p", "#b": "q"}),
    named(TWO_PATHS, {"#a": "p", "#b": "p"}),  # the same string: two actions on one path
    named(ONE_PATH, {"#k": "v"}),
    named(ONE_PATH, {"#k": "sk"}),  # the same string updating the key
    plain("SET a = :x SET b = :x", x={"N": "1"}),  # two SET clauses
    plain("SET a = :x SET b = :x", x={"N": "1"}),
    named(TWO_PATHS, {"#a": "p", "#b": "q"}),
]


def outcome(ddb: Any, table: str, update: dict[str, Any]) -> dict[str, Any]:
    key = {"pk": {"S": "part#1"}, "sk": {"N": "7"}}
    try:
        answer = ddb.update_item(
            TableName=table,
            Key=key,
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            **update,
        )
    except ddb.exceptions.ClientError as exc:
        return {"error": exc.response["Error"].get("Code"), "item": exc.response.get("Item")}
    return {"attributes": answer.get("Attributes")}


def test_repeated_expressions_update_as_unpatched_moto_does(stack: StackDescription, unpatched: Any) -> None:
    ddb, table = client("dynamodb", stack), f"update-{uuid.uuid4().hex[:8]}"
    reference = f"reference-{table}"
    load(ddb, table)
    load(unpatched, reference)
    try:
        outcomes: list[dict[str, Any]] = []
        for update in UPDATES:
            served = outcome(ddb, table, update)
            assert served == outcome(unpatched, reference, update), update
            outcomes.append(served)
        # Each kind of answer came: applied updates, failed conditions, expressions that do not parse
        assert "attributes" in outcomes[0] and outcomes[2]["error"] == "ConditionalCheckFailedException"
        assert "attributes" in outcomes[4] and outcomes[5]["error"] == "ConditionalCheckFailedException"
        assert outcomes[8]["error"] == outcomes[9]["error"] == "ValidationException"
        assert "error" in outcomes[10] and "error" in outcomes[11]  # moto's own answers, whatever they are
        assert "attributes" in outcomes[15] and "attributes" in outcomes[17] and "attributes" in outcomes[21]
        assert [outcomes[i]["error"] for i in (16, 18, 19, 20)] == ["ValidationException"] * 4
    finally:
        ddb.delete_table(TableName=table)
        unpatched.delete_table(TableName=reference)
