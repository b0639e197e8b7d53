"""Health probes for the AWS dependencies: cheap data- or control-plane calls, no retries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from spool_core.health import Unhealthy

if TYPE_CHECKING:
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient


def dynamodb_tables(client: DynamoDBClient, tables: Sequence[str]) -> Mapping[str, Any]:
    statuses = {}
    for table in tables:
        status = client.describe_table(TableName=table)["Table"].get("TableStatus", "UNKNOWN")
        if status not in {"ACTIVE", "UPDATING"}:
            raise RuntimeError(f"table {table} is {status}")
        statuses[table] = status
    return {"tables": len(statuses)}


def s3_bucket(client: S3Client, bucket: str) -> Mapping[str, Any]:
    client.head_bucket(Bucket=bucket)
    return {}


_DEPTH: Final = "ApproximateNumberOfMessages"
_IN_FLIGHT: Final = "ApproximateNumberOfMessagesNotVisible"


def sqs_queues(
    client: SQSClient, queue_url: str, dead_letter_url: str, cloudwatch: CloudWatchClient | None = None
) -> Mapping[str, Any]:
    queue = client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[_DEPTH, _IN_FLIGHT])["Attributes"]
    dead = client.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=[_DEPTH, _IN_FLIGHT])[
        "Attributes"
    ]
    return {
        "depth": int(queue.get(_DEPTH, "0")),
        "in_flight": int(queue.get(_IN_FLIGHT, "0")),
        # Dead letters being handled are in flight, not gone: both count (a stuck one is in flight
        # most of the time, between its retries).
        "dead_letter_depth": int(dead.get(_DEPTH, "0")) + int(dead.get(_IN_FLIGHT, "0")),
        "oldest_message_age_seconds": _oldest_age(cloudwatch, queue_url) if cloudwatch else None,
    }


def dead_letters(client: SQSClient, dead_letter_url: str) -> Mapping[str, Any]:
    """Jobs whose messages failed (visible or being handled): any at all makes Spool degraded."""
    dead = client.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=[_DEPTH, _IN_FLIGHT])[
        "Attributes"
    ]
    depth = int(dead.get(_DEPTH, "0")) + int(dead.get(_IN_FLIGHT, "0"))
    if depth:
        raise Unhealthy(f"{depth} job message(s) in the dead-letter queue", {"depth": depth})
    return {"depth": 0}


def _oldest_age(cloudwatch: CloudWatchClient, queue_url: str) -> float | None:
    """SQS publishes the age of the oldest message only as a CloudWatch metric (none locally)."""
    now = datetime.now(UTC)
    stats = cloudwatch.get_metric_statistics(
        Namespace="AWS/SQS",
        MetricName="ApproximateAgeOfOldestMessage",
        Dimensions=[{"Name": "QueueName", "Value": queue_url.rstrip("/").rsplit("/", 1)[-1]}],
        StartTime=now - timedelta(minutes=5),
        EndTime=now,
        Period=60,
        Statistics=["Maximum"],
    )
    points = sorted(stats.get("Datapoints", []), key=lambda p: p["Timestamp"])
    return float(points[-1]["Maximum"]) if points else None
