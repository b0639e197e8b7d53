"""Least privilege, checked on template.yaml itself.

Every permission a function's role grants names its actions (no wildcard in an action) and its
resources (no resource that is "*" or ends in "*"), except the few allowed below, each with its
reason. No function can Scan a table: a Scan reads every tenant's items, while every call the code
makes is built from one tenant's key. The functions fed by a queue or a table stream have roles of
their own, because SAM would otherwise attach AWS's execution policies for those (which allow "*").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from spool.devstack.template import Template
from tests.support import ROOT

PARTITION_REGION_ACCOUNT = r"arn:\$\{AWS::Partition\}:(\w+):\$\{AWS::Region\}:\$\{AWS::AccountId\}:"


@dataclass(frozen=True)
class Allowed:
    action: str  # regular expression, the whole action
    resource: str  # regular expression, the whole resource as written (see _render)
    why: str


ALLOWED = (
    Allowed(
        r"xray:(PutTraceSegments|PutTelemetryRecords)",
        r"\*",
        "X-Ray has no resource-level permissions (Tracing: Active on every function)",
    ),
    Allowed(
        r"cloudwatch:GetMetricStatistics",
        r"\*",
        "CloudWatch metric reads have no resource-level permissions (the health check's queue age)",
    ),
    Allowed(
        r"logs:(CreateLogStream|PutLogEvents)",
        r"\$\{\w+LogGroup\.Arn\}:\*",
        "a log group's ARN ends in :* (the streams of that one group); each role names its own group",
    ),
    Allowed(
        r"execute-api:ManageConnections",
        PARTITION_REGION_ACCOUNT.replace(r"(\w+)", "execute-api")
        + r"\$\{WebSocketApi\}/\$\{StageName\}/(POST|DELETE)/@connections/\*",
        "pushes to (POST) and closes (DELETE) any connection of Spool's own WebSocket API and stage: "
        "connection ids are the clients'",
    ),
    Allowed(
        r"s3:(GetObject|PutObject|DeleteObject)",
        r"\$\{ContextBucket\.Arn\}/(t|uploads)/\*",
        "objects under the bucket's two prefixes: keys carry the tenant (TenantScope builds them) and "
        "the bucket expires each prefix on its own schedule",
    ),
    Allowed(
        r"s3:PutObject",
        r"\$\{ContextBucket\.Arn\}/t/\*/requests/\*",
        "a job's messages too large for its item, written by the functions that create jobs: any "
        "tenant's (the key carries it), and nothing else under the tenants' prefix",
    ),
    Allowed(
        r"ssm:GetParameter",
        PARTITION_REGION_ACCOUNT.replace(r"(\w+)", "ssm") + r"parameter/spool/\*",
        "the operator names the registry and key parameters (ModelsParameter, OpenAIApiKeyParameter); "
        "they live under /spool/",
    ),
    Allowed(
        r"secretsmanager:GetSecretValue",
        PARTITION_REGION_ACCOUNT.replace(r"(\w+)", "secretsmanager") + r"secret:spool/\*",
        "the OpenAI-compatible endpoint's key, named by the operator (a secret's ARN also ends in a "
        "random suffix)",
    ),
    Allowed(
        r"appconfig:(StartConfigurationSession|GetLatestConfiguration)",
        PARTITION_REGION_ACCOUNT.replace(r"(\w+)", "appconfig") + r"application/\*",
        "FlagsAppConfig names the application, environment and profile, while their ARNs need ids; "
        "granted only when FlagsAppConfig is set",
    ),
    Allowed(
        r"bedrock:InvokeModelWithResponseStream",
        r"arn:\$\{AWS::Partition\}:bedrock:\*:(\$\{AWS::AccountId\})?:(foundation-model|inference-profile)/\*",
        "the model registry (a file, SSM or AppConfig) picks models at run time; cross-region "
        "inference profiles answer from other regions",
    ),
    Allowed(
        r"dynamodb:ListStreams",
        r"\$\{(Chunks|Jobs)Table\.Arn\}/stream/\*",
        "the streams of one table (a stream's ARN ends in its creation time)",
    ),
)

# AWS managed policies a role may carry, by role: (policy ARN suffix, why).
MANAGED_POLICIES = {
    "ApiGatewayLogsRole": (
        "service-role/AmazonAPIGatewayPushToCloudWatchLogs",
        "the role API Gateway's account settings name to write access logs, as AWS documents it",
    ),
}

EVENT_SOURCES_WITH_STAR_POLICIES = {
    "SQS",
    "DynamoDB",
    "Kinesis",
    "MSK",
    "MQ",
    "SelfManagedKafka",
    "DocumentDB",
}


@dataclass(frozen=True)
class Grant:
    owner: str  # the function or role whose policy grants it
    action: str
    resource: str


@pytest.fixture(scope="module")
def template() -> Template:
    return Template.load(ROOT / "template.yaml")


def _branches(value: Any) -> Iterator[Any]:
    """A value, or each side of an ``Fn::If`` (``AWS::NoValue`` dropped)."""
    if isinstance(value, dict) and "Fn::If" in value:
        _, yes, no = value["Fn::If"]
        yield from _branches(yes)
        yield from _branches(no)
    elif value != {"Ref": "AWS::NoValue"}:
        yield value


def _listed(value: Any) -> Iterator[Any]:
    for item in value if isinstance(value, list) else [value]:
        yield from _branches(item)


def _render(value: Any, template: Template) -> str:
    """A resource as written: ``${X}`` for a Ref, ``${X.Attr}`` for a GetAtt, a Sub's text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Ref" in value:
        return f"${{{value['Ref']}}}"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        name, attribute = value["Fn::GetAtt"]
        rendered = f"${{{name}.{attribute}}}"
        if attribute == "Arn" and template.resources[name]["Type"] == "AWS::Logs::LogGroup":
            rendered += ":*"  # what that ARN is: arn:...:log-group:<name>:*
        return rendered
    if isinstance(value, dict) and "Fn::Sub" in value:
        text = value["Fn::Sub"]
        return str(text if isinstance(text, str) else text[0])
    return json.dumps(value)


def _statements(document: Any) -> Iterator[dict[str, Any]]:
    yield from _listed(document.get("Statement", []))


def _documents(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every identity policy document in the template, with its owner."""
    for name, resource in template.resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::Function":
            for policy in _listed(props.get("Policies", [])):
                yield name, policy
        elif resource["Type"] == "AWS::IAM::Role":
            for policy in _listed(props.get("Policies", [])):
                yield name, policy["PolicyDocument"]
        elif resource["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            yield name, props["PolicyDocument"]


def _grants(template: Template) -> Iterator[Grant]:
    for owner, document in _documents(template):
        if not (isinstance(document, dict) and "Statement" in document):
            continue  # a SAM policy template or a managed policy: test_policies_are_written_out fails
        for statement in _statements(document):
            assert "NotAction" not in statement and "NotResource" not in statement, owner
            if statement["Effect"] != "Allow":
                continue
            for action in _listed(statement["Action"]):
                for resource in _listed(statement["Resource"]):
                    yield Grant(owner, str(action), _render(resource, template))


def _allowance(grant: Grant) -> Allowed | None:
    return next(
        (
            rule
            for rule in ALLOWED
            if re.fullmatch(rule.action, grant.action) and re.fullmatch(rule.resource, grant.resource)
        ),
        None,
    )


def _broad(grant: Grant) -> bool:
    return "*" in grant.action or grant.resource == "*" or grant.resource.endswith("*")


def test_every_grant_names_its_actions_and_resources(template: Template) -> None:
    grants = list(_grants(template))
    assert len(grants) > 50  # the walk found the policies
    broad = [g for g in grants if _broad(g) and ("*" in g.action or _allowance(g) is None)]
    assert not broad, "wildcards outside the allow-list:\n" + "\n".join(
        f"  {g.owner}: {g.action} on {g.resource}" for g in broad
    )


def test_each_allowance_is_still_used(template: Template) -> None:
    used = {_allowance(g) for g in _grants(template) if _broad(g)}
    unused = [rule.action for rule in ALLOWED if rule not in used]
    assert not unused, f"allow-list entries nothing needs any more (remove them): {unused}"


def test_policies_are_written_out(template: Template) -> None:
    """Statements only: SAM's policy templates (DynamoDBCrudPolicy, DynamoDBReadPolicy, ...) grant
    Scan and every index, and a managed policy's grants cannot be read here."""
    opaque = [
        (owner, doc)
        for owner, doc in _documents(template)
        if not isinstance(doc, dict) or "Statement" not in doc
    ]
    assert not opaque, f"write these out as Statements: {opaque}"


def test_no_function_can_scan_or_read_any_index(template: Template) -> None:
    problems = [
        f"{g.owner}: {g.action} on {g.resource}"
        for g in _grants(template)
        if g.action == "dynamodb:Scan"
        or ("/index/" in g.resource and (g.resource.endswith("*") or g.action != "dynamodb:Query"))
    ]
    assert not problems, "a Scan, or an index not named or not only queried:\n" + "\n".join(problems)


def test_functions_fed_by_queues_or_streams_have_their_own_role(template: Template) -> None:
    functions = template.resources_of_type("AWS::Serverless::Function")
    fed = {}
    for name, resource in functions.items():
        props = resource["Properties"]
        if {e["Type"] for e in (props.get("Events") or {}).values()} & EVENT_SOURCES_WITH_STAR_POLICIES:
            fed[name] = props
    assert {"WorkerFunction", "DeadLetterFunction", "FanoutFunction"} <= set(fed)
    for name, props in fed.items():
        assert "Role" in props and "Policies" not in props, name
        role = props["Role"]["Fn::GetAtt"][0]
        log_group = props["LoggingConfig"]["LogGroup"]["Ref"]
        logs = {g.resource for g in _grants(template) if g.owner == role and g.action.startswith("logs:")}
        assert logs == {f"${{{log_group}.Arn}}:*"}, f"{role} writes logs only to {name}'s group"


def test_managed_policies_only_where_aws_documents_them(template: Template) -> None:
    for name, resource in template.resources_of_type("AWS::IAM::Role").items():
        for arn in resource["Properties"].get("ManagedPolicyArns", []):
            expected = MANAGED_POLICIES.get(name)
            assert expected is not None and _render(arn, template).endswith(expected[0]), (name, arn)


def test_public_routes_need_no_usage_key(template: Template) -> None:
    """API Gateway meters every other route by the tenant's usage key, which only the authorizer
    supplies: a route without the authorizer must not require one, or it answers 403."""
    api = template.api("SpoolApi")
    assert api["ApiKeySourceType"] == "AUTHORIZER"
    assert api["Auth"]["ApiKeyRequired"] is True
    public = []
    for name, resource in template.resources_of_type("AWS::Serverless::Function").items():
        for event_name, event in (resource["Properties"].get("Events") or {}).items():
            auth = event.get("Properties", {}).get("Auth") or {}
            if event["Type"] == "Api" and auth.get("Authorizer") == "NONE":
                assert auth.get("ApiKeyRequired") is False, f"{name}.{event_name}"
                public.append(event["Properties"]["Path"])
    assert {"/v1/health", "/v1/openapi.json", "/", "/{proxy+}"} == set(public)


def test_every_function_logs_to_its_own_group_with_a_retention(template: Template) -> None:
    groups = template.resources_of_type("AWS::Logs::LogGroup")
    used = []
    for name, resource in template.resources_of_type("AWS::Serverless::Function").items():
        group = resource["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        assert groups[group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name
        used.append(group)
    assert len(used) == len(set(used))


def test_every_function_that_ends_jobs_can_read_and_write_what_their_settlement_does(
    template: Template,
) -> None:
    """A settlement reads the tenant's limits and buckets (one BatchGetItem), then writes its moves in
    the job's final transaction. The dead-letter role could only write: on AWS its settlements were
    refused and fell back to releasing the slot, the job's tokens neither refunded nor counted (no
    tour reaches a dead letter, so the calls test could not see it)."""
    grants = {(g.owner, g.action) for g in _grants(template) if g.resource == "${UsageTable.Arn}"}
    for owner in ("WorkerRole", "DeadLetterRole", "JobsFunction", "StreamFunction"):
        assert {(owner, "dynamodb:BatchGetItem"), (owner, "dynamodb:UpdateItem")} <= grants, owner
    for owner in ("JobsFunction", "StreamFunction"):  # admission's takes hold on the limits item
        assert (owner, "dynamodb:ConditionCheckItem") in grants, owner
