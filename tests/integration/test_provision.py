"""The local resources are the template's resources: same keys, TTL, stream, redrive, parameters."""

from __future__ import annotations

import json

from spool.devstack.provision import StackDescription
from spool.devstack.template import Template
from tests.integration.conftest import client


def test_every_table_has_the_templates_key_schema_billing_and_ttl(
    template: Template, stack: StackDescription
) -> None:
    ddb = client("dynamodb", stack)
    for name, resource in template.resources_of_type("AWS::DynamoDB::Table").items():
        props = resource["Properties"]
        table = ddb.describe_table(TableName=stack.refs[name])["Table"]
        assert table["KeySchema"] == props["KeySchema"], name
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        ttl = ddb.describe_time_to_live(TableName=stack.refs[name])["TimeToLiveDescription"]
        if "TimeToLiveSpecification" in props:
            assert ttl["TimeToLiveStatus"] == "ENABLED", name
            assert ttl["AttributeName"] == props["TimeToLiveSpecification"]["AttributeName"]


def test_the_chunk_table_streams_new_images(stack: StackDescription) -> None:
    table = client("dynamodb", stack).describe_table(TableName=stack.refs["ChunksTable"])["Table"]
    assert table["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"}
    assert stack.attributes["ChunksTable.StreamArn"] == table["LatestStreamArn"]


def test_the_queue_takes_parameter_overrides_and_redrives_to_the_dead_letter_queue(
    stack: StackDescription,
) -> None:
    sqs = client("sqs", stack)
    attributes = sqs.get_queue_attributes(QueueUrl=stack.refs["JobsQueue"], AttributeNames=["All"])[
        "Attributes"
    ]
    assert attributes["VisibilityTimeout"] == "1"
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive == {
        "deadLetterTargetArn": stack.attributes["JobsDeadLetterQueue.Arn"],
        "maxReceiveCount": 2,
    }


def test_function_environment_resolves_every_reference(template: Template, stack: StackDescription) -> None:
    env = stack.function_environment(template)
    assert env["SPOOL_BUCKET"] == stack.refs["ContextBucket"]
    assert env["SPOOL_JOBS_QUEUE_URL"].startswith(stack.endpoint_url)
    assert env["POWERTOOLS_LOG_LEVEL"] == "INFO"
    assert client("s3", stack).head_bucket(Bucket=env["SPOOL_BUCKET"])


def test_the_bucket_blocks_public_access_and_expires_context_objects(stack: StackDescription) -> None:
    s3 = client("s3", stack)
    bucket = stack.refs["ContextBucket"]
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["expire-context-objects"]["Expiration"]["Days"] == 9
    assert rules["expire-context-objects"]["Filter"]["Prefix"] == "t/"
