"""make bench's cost arithmetic: DynamoDB item sizes and request units, the meter's accounting per
call, prices times counts, and the side-by-side bench's loopback upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections import Counter
from typing import Any

import pytest

from bench.capacity import (
    METER_SWITCH,
    CapacityMeter,
    TableShape,
    _DeferredMeter,
    item_size,
    number_size,
    read_dumps,
    read_units,
    value_size,
    write_units,
)
from bench.cost import (
    Prices,
    Usage,
    add_aws_calls,
    aws_duration_ms,
    billed_ms,
    capacity_delta,
    costs,
    counter_delta,
    gb_seconds,
    increments,
    percent_of_output,
)
from bench.side_by_side import (
    FIRST_TOKEN,
    Row,
    Stream,
    completion_chunk,
    format_row,
    loopback_models,
    quantile,
    rate_of,
    upstream_app,
    verdicts,
)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------- sizes and units
def test_item_size_follows_dynamodbs_rules() -> None:
    assert item_size(None) == 0
    assert item_size({"pk": {"S": "abc"}}) == 2 + 3
    assert item_size({"name": {"S": "é"}}) == 4 + 2  # UTF-8 bytes
    assert number_size("12345") == 4  # 5 significant digits: 3 bytes + 1
    assert number_size("1000") == 2  # trailing zeros are not significant
    assert number_size("0") == 2
    assert item_size({"n": {"N": "0.0012"}}) == 1 + 2
    assert item_size({"b": {"B": base64.b64encode(b"12345").decode()}}) == 1 + 5
    assert item_size({"f": {"BOOL": True}, "z": {"NULL": True}}) == 2 + 2
    assert item_size({"l": {"L": [{"S": "ab"}, {"N": "1"}]}}) == 1 + 3 + (2 + 1) + (2 + 1)
    assert item_size({"m": {"M": {"k": {"S": "v"}}}}) == 1 + 3 + (1 + 1 + 1)
    assert item_size({"s": {"SS": ["a", "bc"]}, "t": {"NS": ["1", "22"]}}) == 1 + 3 + 1 + 4
    assert item_size({"plain": "text"}) == 5 + 4  # a boto3 resource's plain value, serialized first
    with pytest.raises(ValueError, match="not a DynamoDB attribute value"):
        value_size({"Q": "1"})


def test_write_and_read_units() -> None:
    assert write_units(0) == 1
    assert write_units(1024) == 1
    assert write_units(1025) == 2
    assert write_units(6900, transactional=True) == 14
    assert read_units(0, consistent=False) == 0.5
    assert read_units(4096, consistent=True) == 1.0
    assert read_units(4097, consistent=False) == 1.0
    assert read_units(100, consistent=True, transactional=True) == 2.0


def test_index_writes_of_a_sparse_keys_only_index() -> None:
    shape = TableShape(
        {
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [
                {
                    "KeySchema": [{"AttributeName": "shard", "KeyType": "HASH"}],
                    "Projection": {"ProjectionType": "KEYS_ONLY"},
                }
            ],
        }
    )
    plain = {"pk": {"S": "j1"}, "status": {"S": "queued"}}
    pending = {**plain, "shard": {"N": "3"}}
    assert shape.index_write_units(None, plain) == 0  # not in the index
    assert shape.index_write_units(None, pending) == 1  # enters it
    assert shape.index_write_units(pending, {**pending, "status": {"S": "running"}}) == 0  # keys only: same
    assert shape.index_write_units(pending, plain) == 1  # leaves it
    assert shape.index_write_units(pending, {**pending, "shard": {"N": "4"}}) == 2  # moves: delete + put
    assert shape.key_of(pending) == {"pk": {"S": "j1"}}


# ---------------------------------------------------------------------------------------- the meter
class FakeDynamo:
    """Just enough of DynamoDB's low-level API (wire format) for the meter: one table keyed by pk."""

    def __init__(self, index: bool = False) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.index = index  # a sparse keys-only global index on "shard"

    def __call__(self, client: Any, operation: str, params: dict[str, Any]) -> Any:
        self.calls[operation] += 1
        if operation == "DescribeTable":
            table: dict[str, Any] = {"KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}]}
            if self.index:
                table["GlobalSecondaryIndexes"] = [
                    {
                        "KeySchema": [{"AttributeName": "shard", "KeyType": "HASH"}],
                        "Projection": {"ProjectionType": "KEYS_ONLY"},
                    }
                ]
            return {"Table": table}
        if operation == "GetItem":
            item = self.items.get(params["Key"]["pk"]["S"])
            return {"Item": item} if item else {}
        if operation == "PutItem":
            if params.get("ConditionExpression") and params["Item"]["pk"]["S"] in self.items:
                raise RuntimeError("ConditionalCheckFailedException")
            self.items[params["Item"]["pk"]["S"]] = params["Item"]
            return {}
        if operation == "UpdateItem":  # SET text = :text
            key = params["Key"]["pk"]["S"]
            self.items[key] = {
                **self.items.get(key, params["Key"]),
                "text": params["ExpressionAttributeValues"][":t"],
            }
            return {}
        if operation == "DeleteItem":
            self.items.pop(params["Key"]["pk"]["S"], None)
            return {}
        if operation == "Query":
            return {"Items": list(self.items.values())}
        if operation == "TransactWriteItems":
            for entry in params["TransactItems"]:
                if "Put" in entry:
                    self.items[entry["Put"]["Item"]["pk"]["S"]] = entry["Put"]["Item"]
            return {}
        if operation == "BatchGetItem":
            return {
                "Responses": {"T": [self.items[k["pk"]["S"]] for k in params["RequestItems"]["T"]["Keys"]]}
            }
        if operation == "BatchWriteItem":
            for request in params["RequestItems"]["T"]:
                item = request["PutRequest"]["Item"]
                self.items[item["pk"]["S"]] = item
            return {}
        raise AssertionError(operation)


def metered(index: bool = False) -> tuple[CapacityMeter, FakeDynamo]:
    ticks = iter(range(1000))
    meter, dynamo = CapacityMeter(clock=lambda: float(next(ticks))), FakeDynamo(index)
    meter._original = dynamo
    return meter, dynamo


def text_of(size: int) -> dict[str, str]:
    return {"S": "x" * size}


def test_the_meter_bills_the_larger_item_of_a_write_and_reads_by_size(tmp_path: Any) -> None:
    meter, dynamo = metered()
    meter._dump_to = tmp_path / "WorkerFunction-1.json"
    key = {"pk": {"S": "a"}}
    meter.call(None, "PutItem", {"TableName": "T", "Item": {**key, "text": text_of(3000)}})
    assert meter.units["T"]["write"] == 3
    # an update that shrinks the item is billed for the item before it
    meter.call(
        None, "UpdateItem", {"TableName": "T", "Key": key, "ExpressionAttributeValues": {":t": text_of(10)}}
    )
    assert meter.units["T"]["write"] == 3 + 3
    meter.call(None, "GetItem", {"TableName": "T", "Key": key, "ProjectionExpression": "#a0"})
    assert meter.units["T"]["read"] == 0.5  # eventually consistent, under 4 KB
    meter.call(None, "Query", {"TableName": "T", "ConsistentRead": True})
    assert meter.units["T"]["read"] == 1.5
    meter.call(None, "DeleteItem", {"TableName": "T", "Key": key})
    assert meter.units["T"]["write"] == 7
    # the shadow reads and the table's description are not calls the application made
    assert dynamo.calls["DescribeTable"] == 1
    # 6 reads of its own (a description, 5 items), each 1 tick of the injected clock
    assert json.loads((tmp_path / "WorkerFunction-1.json").read_text()) == {
        "T": {"write": 7, "read": 1.5},
        "_meter": {"shadow_seconds": 6.0},
    }


def test_the_meter_bills_a_failed_condition_and_doubles_transactions() -> None:
    meter, _ = metered()
    item = {"pk": {"S": "b"}, "text": text_of(1500)}
    meter.call(None, "PutItem", {"TableName": "T", "Item": item})
    with pytest.raises(RuntimeError, match="ConditionalCheckFailed"):
        meter.call(
            None,
            "PutItem",
            {"TableName": "T", "Item": item, "ConditionExpression": "attribute_not_exists(pk)"},
        )
    assert meter.units["T"]["write"] == 2 + 2
    meter.call(
        None,
        "TransactWriteItems",
        {
            "TransactItems": [
                {"Put": {"TableName": "T", "Item": {"pk": {"S": "c"}, "text": text_of(100)}}},
                {"ConditionCheck": {"TableName": "T", "Key": {"pk": {"S": "b"}}}},
            ]
        },
    )
    assert meter.units["T"]["write"] == 4 + 2 + 4  # a 1 KB put and a 2 KB check, each twice
    meter.call(
        None, "BatchWriteItem", {"RequestItems": {"T": [{"PutRequest": {"Item": {"pk": {"S": "d"}}}}]}}
    )
    assert meter.units["T"]["write"] == 11
    meter.call(
        None,
        "BatchGetItem",
        {"RequestItems": {"T": {"Keys": [{"pk": {"S": "b"}}, {"pk": {"S": "c"}}], "ConsistentRead": True}}},
    )
    assert meter.units["T"]["read"] == 2.0
    described = meter.call(None, "DescribeTable", {"TableName": "T"})  # unmetered: passed through
    assert described["Table"]["KeySchema"][0]["AttributeName"] == "pk"


def test_a_transaction_doubles_the_table_write_not_the_index_write() -> None:
    meter, _ = metered(index=True)
    item = {"pk": {"S": "j"}, "shard": {"N": "1"}, "text": text_of(100)}
    meter.call(None, "TransactWriteItems", {"TransactItems": [{"Put": {"TableName": "T", "Item": item}}]})
    assert meter.units["T"]["write"] == 2 + 1  # the index is updated after the transaction, as outside one
    meter.call(None, "PutItem", {"TableName": "T", "Item": {**item, "pk": {"S": "k"}}})
    assert meter.units["T"]["write"] == 3 + 1 + 1


# ---------------------------------------------------------------------------------------- prices x counts
def test_costs_multiply_counts_by_the_list_prices() -> None:
    prices = Prices.load()
    usage = Usage(rest_requests=2, websocket_messages=100, websocket_connection_minutes=1)
    usage.lambda_requests.update({"WorkerFunction": 1, "FanoutFunction": 10})
    usage.lambda_gb_seconds.update({"WorkerFunction": 20.0, "FanoutFunction": 0.5})
    usage.lambda_architecture.update({"WorkerFunction": "x86_64", "FanoutFunction": "arm64"})
    usage.write_units.update({"ChunksTable": 100.0, "JobsTable": 60.0})
    usage.read_units.update({"JobsTable": 80.0})
    add_aws_calls(
        usage,
        {
            "sqs.SendMessage": 1,
            "sqs.ChangeMessageVisibility": 2,
            "s3.GetObject": 3,
            "s3.PutObject": 1,
            "secretsmanager.GetSecretValue": 1,
            "apigatewaymanagementapi.PostToConnection": 50,
            "dynamodb.PutItem": 100,
        },
    )
    lines = costs(usage, prices)
    assert lines["Lambda WorkerFunction"] == pytest.approx(0.2 / 1e6 + 20 * 0.0000166667)
    assert lines["Lambda FanoutFunction"] == pytest.approx(10 * 0.2 / 1e6 + 0.5 * 0.0000133334)
    assert lines["API Gateway REST requests"] == pytest.approx(2 * 3.5 / 1e6)
    assert lines["API Gateway WebSocket messages"] == pytest.approx(150 * 1.0 / 1e6)
    assert lines["API Gateway WebSocket connection minutes"] == pytest.approx(0.25 / 1e6)
    assert lines["DynamoDB writes"] == pytest.approx(160 * 0.625 / 1e6)
    assert lines["DynamoDB reads"] == pytest.approx(80 * 0.125 / 1e6)
    assert lines["SQS requests"] == pytest.approx(3 * 0.4 / 1e6)
    assert lines["S3 requests"] == pytest.approx(0.005 / 1e3 + 3 * 0.0004 / 1e3)
    assert lines["Secrets Manager calls"] == pytest.approx(0.05 / 1e4)
    assert usage.aws_calls["dynamodb.PutItem"] == 100
    assert prices.output_price(1000) == pytest.approx(0.005)
    assert percent_of_output(0.0001, prices, 1000) == pytest.approx(2.0)


def test_billing_units() -> None:
    assert billed_ms(0.2) == 1
    assert billed_ms(20862.1) == 20863
    assert gb_seconds(1000, 1024) == 1.0
    assert gb_seconds(500, 256) == 0.125
    assert increments(100, 32768) == 1
    assert increments(65537, 65536) == 2


def test_cpu_bound_work_runs_longer_at_a_smaller_share_of_a_vcpu() -> None:
    assert aws_duration_ms(15.0, 10.0, 128) == pytest.approx(10.0 * 1769 / 128)  # a push at 128 MB
    assert aws_duration_ms(15.0, 10.0, 1769) == 15.0  # a whole vCPU: as measured
    assert aws_duration_ms(20_000.0, 380.0, 192) == 20_000.0  # paced by its provider: its CPU fits
    assert aws_duration_ms(15.0, None, 128) == 15.0  # a report without CPU time


def test_deltas_between_snapshots() -> None:
    before = {"WorkerFunction-7": Counter({"dynamodb.PutItem": 5})}
    after = {
        "WorkerFunction-7": Counter({"dynamodb.PutItem": 8}),
        "FanoutFunction-9": Counter({"dynamodb.Query": 2}),
    }
    assert counter_delta(before, after) == Counter(
        {"WorkerFunction:dynamodb.PutItem": 3, "FanoutFunction:dynamodb.Query": 2}
    )
    units_before = {"w-1": {"T": {"write": 2.0, "read": 1.0}, "_meter": {"shadow_seconds": 1.0}}}
    units_after = {
        "w-1": {"T": {"write": 5.0, "read": 1.0}, "_meter": {"shadow_seconds": 3.5}},
        "f-2": {"U": {"read": 0.5}},
    }
    assert capacity_delta(units_before, units_after) == {
        "T": {"read": 0.0, "write": 3.0},
        "U": {"read": 0.5, "write": 0.0},
    }


# ---------------------------------------------------------------------------------------- side by side
def test_loopback_upstream_streams_openai_chunks() -> None:
    sent: list[dict[str, Any]] = []
    body = json.dumps({"model": "loop-0", "max_tokens": 3, "messages": [{"role": "user", "content": "a b"}]})
    requests = [{"type": "http.request", "body": body.encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        return requests.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(upstream_app(scope, receive, send))
    assert sent[0]["status"] == 200
    stream = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    events = [line.removeprefix("data: ") for line in stream.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert texts == ["", " the", " of", " and", None]
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

    sent.clear()
    requests.append({"type": "http.request", "body": b"", "more_body": False})
    asyncio.run(upstream_app({"type": "http", "method": "GET", "path": "/v1/models"}, receive, send))
    assert sent[0]["status"] == 404


def test_side_by_side_helpers() -> None:
    assert rate_of("loop-50") == 50
    assert rate_of("loop-0") == 0
    assert rate_of("gpt") == 0
    assert quantile([], 0.5) == 0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert b'"usage"' in completion_chunk(1, "m", 0, usage={"completion_tokens": 1})
    models = loopback_models("http://127.0.0.1:1/v1")
    added = {m["id"]: m for m in models["models"] if m["id"].startswith("loopback")}
    assert added["loopback-50"]["provider_model_id"] == "loop-50"
    assert added["loopback-max"]["options"] == {"base_url": "http://127.0.0.1:1/v1"}


def test_the_containers_meter_counts_only_while_switched_on(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "spool-local-WorkerFunction")
    meter, dynamo = _DeferredMeter(tmp_path), FakeDynamo()
    meter._original = dynamo
    put = {"TableName": "T", "Item": {"pk": {"S": "a"}}}
    meter.call(None, "PutItem", put)
    assert dynamo.calls == Counter({"PutItem": 1})  # passed straight through: no reads of its own
    assert read_dumps(tmp_path) == {}
    (tmp_path / METER_SWITCH).touch()
    meter.call(None, "PutItem", put)
    dumps = read_dumps(tmp_path)
    assert list(dumps) == [f"spool-local-WorkerFunction-{os.getpid()}"]
    assert dumps[f"spool-local-WorkerFunction-{os.getpid()}"]["T"] == {"write": 1}


def test_side_by_side_rows_and_targets() -> None:
    def stream(started: float, *arrivals: float, persist: tuple[float, ...] = ()) -> Stream:
        return Stream(started, list(arrivals), list(persist))

    direct = Row("direct", [stream(0.0, 0.01, 0.03, 10.0)], sequential=True)
    sse = Row("sse", [stream(0.0, 0.09, 0.3, 10.2, persist=(0.05, 0.12))], sequential=True)
    assert direct.wall == pytest.approx(10.0)
    assert sse.gap(0.5) == pytest.approx(0.21)
    assert "Spool's TTFT share    80 ms" in format_row(sse, direct)
    assert "persist-to-client p50   50 ms p95  120 ms" in format_row(sse, direct)
    many = Row("direct", [stream(0.0, 0.1, 2.0), stream(0.5, 0.6, 2.5)])
    assert many.wall == pytest.approx(2.5)
    stuck = Row("poll", [], errors=[TimeoutError("late")])
    assert "FAILED: 1 of 1 streams failed" in format_row(stuck, direct)
    partly = Row("websocket", [stream(0.0, 1.0, 9.0)], errors=[TimeoutError("late")])
    results = {
        (500, 1, "direct"): direct,
        (500, 1, "sse"): sse,
        (500, 20, "sse"): Row("sse", [stream(0.0, 1.0, 2.0, persist=(0.04, 0.6))] * 20),
        (1000, 20, "direct"): many,
        (1000, 20, "sse"): Row("sse", [stream(0.0, 1.0, 5.0)]),
        (1000, 20, "websocket"): partly,
    }
    lines = "\n".join(verdicts(results))
    assert "Spool's own share of TTFT, warm, Spool, SSE: 80 ms (target <= 100 ms: meets)" in lines
    assert "persist-to-client p95, Spool, SSE, 1 stream at a time: 120 ms (target <= 150 ms: meets)" in lines
    assert "persist-to-client p95, Spool, SSE, 20 streams: 600 ms (target <= 150 ms: misses)" in lines
    assert "wall vs direct, Spool, SSE: 2.0x (target <= 4x: meets)" in lines
    assert "Spool, WebSocket (1 streams did not end): not all ended (target <= 4x: misses)" in lines


def test_streams_started_together_show_their_delays_by_when_each_chunk_was_written() -> None:
    # Two streams started at 100 s: chunks written in the batch's first 2 s, its last 2 s (the last
    # chunk written at 112 s) and between; the p95 target is decided over all of them as before.
    one = Stream(100.0, [100.6, 106.05, 111.52], [0.5, 0.05, 0.02], written=[100.1, 106.0, 111.5])
    two = Stream(100.0, [101.9, 107.03, 112.4], [0.8, 0.03, 0.4], written=[101.1, 107.0, 112.0])
    together = Row("websocket", [one, two])
    assert together.persist_by_phase() == {
        "first": [0.5, 0.8],
        "between": [0.05, 0.03],
        "last": [0.02, 0.4],
    }
    lines = verdicts({(500, 20, "websocket"): together})
    assert lines[0].endswith("WebSocket, 2 streams: 800 ms (target <= 150 ms: misses)")
    assert lines[1] == (
        "    (information) the batch's chunks by when they were written: in its first 2 s p95 800 ms of 2;"
        " between p95 50 ms of 2; in its last 2 s p95 400 ms of 2"
    )
    # Streams read one at a time, or a batch whose chunks were not matched to the log: no such line.
    assert len(verdicts({(500, 1, "websocket"): Row("websocket", [one], sequential=True)})) == 1
    assert Row("websocket", [Stream(0.0, [1.0], [0.1])]).persist_by_phase() == {}


def test_the_first_token_target_is_decided_by_the_short_warm_jobs_when_they_ran() -> None:
    def stream(ttft: float) -> Stream:
        return Stream(0.0, [ttft, ttft + 0.01])

    results = {
        (500, 1, "direct"): Row("direct", [stream(0.004)], sequential=True),
        (500, 1, "sse"): Row("sse", [stream(0.300)], sequential=True),  # one slow 500-token stream
        (FIRST_TOKEN[0], 1, "direct"): Row("direct", [stream(0.004)] * 15, sequential=True),
        (FIRST_TOKEN[0], 1, "sse"): Row("sse", [stream(0.08)] * 8 + [stream(0.5)] * 7, sequential=True),
    }
    lines = "\n".join(verdicts(results))
    share = "Spool's own share of TTFT, warm, Spool, SSE (median of 15 jobs): 76 ms"
    assert f"{share} (target <= 100 ms: meets)" in lines
