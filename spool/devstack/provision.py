"""The AWS side of the embedded stack: a moto server, and the template's plain resources created on
it through moto's CloudFormation (never from a second hand-written list)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3

from spool.devstack import processes
from spool.devstack.ports import listen
from spool.devstack.template import (
    PSEUDO_ACCOUNT,
    PSEUDO_PARTITION,
    PSEUDO_REGION,
    PSEUDO_STACK,
    PSEUDO_URL_SUFFIX,
    Resolver,
    Template,
    TemplateError,
)

# What moto's CloudFormation can create. Everything else (functions, the API, the bucket policy)
# is either emulated by the local stack or has no local meaning.
PROVISIONED_TYPES = ("AWS::DynamoDB::Table", "AWS::SQS::Queue", "AWS::S3::Bucket")
ACCOUNT_ID = "123456789012"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


class MotoServer:
    """moto's server in a child process (``spool.devstack.moto_server``): the real AWS wire protocol on
    127.0.0.1, with DynamoDB requests serialized as AWS's are atomic."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        sock = listen(self.host, self._requested_port, "SPOOL_MOTO_PORT" if self._requested_port else None)
        self.port = sock.getsockname()[1]
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "spool.devstack.moto_server", str(sock.fileno())],
                pass_fds=[sock.fileno()],
                # moto is not Spool's code: keep a coverage run (which traces every process) out of it.
                env={k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C is for `spool dev`, which stops it
            )
        finally:
            sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):  # noqa: S310 - loopback
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not start on {self.url} within {timeout:g}s")

    def exited(self) -> int | None:
        """The server's exit code once it has exited (killed, crashed), None while it runs."""
        return self._process.poll() if self._process is not None else None

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            processes.stop(self._process, timeout=3)


@dataclass
class StackDescription:
    """What the provisioning produced; enough for another process to rebuild the local stack."""

    template_path: str
    stack_name: str
    region: str
    endpoint_url: str
    parameters: dict[str, str]
    refs: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)  # "Logical.Attribute" -> value
    # Local values that win over the template's (as `sam local --env-vars` would pass them).
    overrides: dict[str, str] = field(default_factory=dict)

    def resolver(self) -> Resolver:
        pseudo = {
            PSEUDO_REGION: self.region,
            PSEUDO_ACCOUNT: ACCOUNT_ID,
            PSEUDO_STACK: self.stack_name,
            PSEUDO_PARTITION: "aws",
            PSEUDO_URL_SUFFIX: "amazonaws.com",
        }
        attributes = {tuple(k.split(".", 1)): v for k, v in self.attributes.items()}
        return Resolver(self.parameters, pseudo, self.refs, attributes)  # type: ignore[arg-type]

    def aws_environment(self) -> dict[str, str]:
        """The variables that point boto3 (in any process) at the moto server."""
        return {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def function_environment(self, template: Template) -> dict[str, str]:
        """The union of every function's resolved environment (Globals merged with its own), for code
        the stack runs in its own process (registering the dev keys, benchmarks); a variable two
        functions set differently is a template error here rather than a silent surprise."""
        merged: dict[str, str] = {}
        for name in template.functions():
            for variable, value in self._resolved_variables(template, name).items():
                if merged.get(variable, value) != value:
                    raise TemplateError(
                        f"{variable} differs between functions; the stack process needs one value"
                    )
                merged[variable] = value
        return merged

    def _resolved_variables(self, template: Template, logical_id: str) -> dict[str, str]:
        resolver = self.resolver()
        spec = template.functions()[logical_id]
        return {name: str(resolver.resolve(value)) for name, value in spec.environment.items()}

    def environment(self, template: Template) -> dict[str, str]:
        """Everything code in the stack's own process needs: AWS endpoint, the functions' variables,
        local overrides."""
        return {**self.aws_environment(), **self.function_environment(template), **self.overrides}

    def environment_for(self, template: Template, logical_id: str) -> dict[str, str]:
        """One function's environment, as Lambda gives it to each of its containers: the runtime's
        variables, the function's own (Globals merged in), and the local overrides."""
        spec = template.functions()[logical_id]
        runtime = {
            "AWS_LAMBDA_FUNCTION_NAME": self.refs.get(logical_id, logical_id),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "_HANDLER": spec.handler,
            "LAMBDA_TASK_ROOT": str(Path(self.template_path).parent / spec.code_uri),
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "en_US.UTF-8",
        }
        return {
            **runtime,
            **self.aws_environment(),
            **self._resolved_variables(template, logical_id),
            **self.overrides,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> StackDescription:
        return cls(**json.loads(path.read_text()))


def aws_client(service: str, endpoint_url: str, region: str) -> Any:
    return boto3.session.Session().client(  # type: ignore[call-overload]
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=CREDENTIALS["AWS_SESSION_TOKEN"],
    )


def provision(
    template: Template,
    endpoint_url: str,
    *,
    stack_name: str = "spool-local",
    region: str = "us-east-1",
    overrides: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> StackDescription:
    """Create the template's tables, queues and bucket on the moto server and describe them."""
    parameters = template.parameter_values(overrides or {})
    # Conditional parts (the jobs table's optional StatusIndex) decided here, as CloudFormation would.
    resources = apply_conditions(
        template.resources_of_type(*PROVISIONED_TYPES), template.body.get("Conditions", {}), parameters
    )
    body = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Parameters": template.body.get("Parameters", {}),
        "Resources": resources,
    }
    cfn = aws_client("cloudformation", endpoint_url, region)
    cfn.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(body),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    deadline = time.monotonic() + timeout
    while (
        status := cfn.describe_stacks(StackName=stack_name)["Stacks"][0]["StackStatus"]
    ) != "CREATE_COMPLETE":
        if status.endswith("FAILED") or "ROLLBACK" in status or time.monotonic() > deadline:
            raise RuntimeError(f"local stack {stack_name} ended {status}")
        time.sleep(0.1)

    description = StackDescription(str(template.path), stack_name, region, endpoint_url, parameters)
    physical = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.describe_stack_resources(StackName=stack_name)["StackResources"]
        if "LogicalResourceId" in r
    }
    _describe_resources(description, resources, physical)
    _create_secrets(description, template)
    _describe_unprovisioned(description, template)
    _apply_what_moto_skips(description, resources)
    return description


_NO_VALUE = object()


def apply_conditions(value: Any, conditions: Mapping[str, Any], parameters: Mapping[str, str]) -> Any:
    """``value`` with every ``Fn::If`` replaced by its chosen branch (list entries and keys that come
    out as ``AWS::NoValue`` removed), the template's conditions evaluated on the parameter values."""

    def condition(name: str) -> bool:
        return truth(conditions[name])

    def truth(expression: Any) -> bool:
        ((function, args),) = expression.items()
        if function == "Condition":
            return condition(args)
        if function == "Fn::Not":
            return not truth(args[0])
        if function == "Fn::And":
            return all(truth(a) for a in args)
        if function == "Fn::Or":
            return any(truth(a) for a in args)
        if function == "Fn::Equals":
            left, right = (
                parameters.get(a["Ref"], a) if isinstance(a, dict) and "Ref" in a else a for a in args
            )
            return str(left) == str(right)
        raise ValueError(f"condition function {function} is not supported by the local stack")

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (walk(item) for item in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if node == {"Ref": "AWS::NoValue"}:
            return _NO_VALUE
        if len(node) == 1 and "Fn::If" in node:
            name, when_true, when_false = node["Fn::If"]
            return walk(when_true if condition(name) else when_false)
        return {k: v for k, v in ((k, walk(v)) for k, v in node.items()) if v is not _NO_VALUE}

    return walk(value)


def _apply_what_moto_skips(description: StackDescription, resources: Mapping[str, Any]) -> None:
    """moto's CloudFormation creates these resources but ignores some of their properties; apply
    those from the same template through the service APIs, so local behaviour matches (TTL above all)."""
    resolver = description.resolver()
    endpoint, region = description.endpoint_url, description.region
    ddb, s3 = aws_client("dynamodb", endpoint, region), aws_client("s3", endpoint, region)
    for name, resource in resources.items():
        props = resolver.resolve(resource.get("Properties", {}))
        if resource["Type"] == "AWS::DynamoDB::Table" and "TimeToLiveSpecification" in props:
            spec = props["TimeToLiveSpecification"]
            ddb.update_time_to_live(
                TableName=description.refs[name],
                TimeToLiveSpecification={
                    "AttributeName": spec["AttributeName"],
                    "Enabled": bool(spec["Enabled"]),
                },
            )
        elif resource["Type"] == "AWS::S3::Bucket":
            bucket = description.refs[name]
            if "PublicAccessBlockConfiguration" in props:
                s3.put_public_access_block(
                    Bucket=bucket, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
                )
            if "LifecycleConfiguration" in props:
                rules = [_lifecycle_rule(rule) for rule in props["LifecycleConfiguration"]["Rules"]]
                s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


def _lifecycle_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A CloudFormation lifecycle rule in the S3 API's shape (the fields the template uses)."""
    api: dict[str, Any] = {
        "ID": rule.get("Id", "rule"),
        "Status": rule["Status"],
        "Filter": {"Prefix": rule.get("Prefix", "")},
    }
    if "ExpirationInDays" in rule:
        api["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    if "AbortIncompleteMultipartUpload" in rule:
        days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
        api["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
    return api


def _describe_resources(
    description: StackDescription, resources: Mapping[str, Any], physical: Mapping[str, str]
) -> None:
    endpoint, region = description.endpoint_url, description.region
    ddb, sqs = aws_client("dynamodb", endpoint, region), aws_client("sqs", endpoint, region)
    for name, resource in resources.items():
        kind, ident = resource["Type"], physical[name]
        if kind == "AWS::DynamoDB::Table":
            table = ddb.describe_table(TableName=ident)["Table"]
            description.refs[name] = ident
            description.attributes[f"{name}.Arn"] = table["TableArn"]
            if "LatestStreamArn" in table:
                description.attributes[f"{name}.StreamArn"] = table["LatestStreamArn"]
        elif kind == "AWS::SQS::Queue":
            queue_name = ident.rstrip("/").rsplit("/", 1)[-1]
            url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            description.refs[name] = url
            description.attributes[f"{name}.Arn"] = arn
            description.attributes[f"{name}.QueueName"] = queue_name
            description.attributes[f"{name}.QueueUrl"] = url
        elif kind == "AWS::S3::Bucket":
            description.refs[name] = ident
            description.attributes[f"{name}.Arn"] = f"arn:aws:s3:::{ident}"
            description.attributes[f"{name}.DomainName"] = f"{ident}.s3.amazonaws.com"


def _create_secrets(description: StackDescription, template: Template) -> None:
    """Secrets Manager secrets (moto's CloudFormation does not create them): a generated value, as
    ``GenerateSecretString`` asks; ``!Ref`` gives the ARN, as on AWS."""
    client = aws_client("secretsmanager", description.endpoint_url, description.region)
    for name, resource in template.resources_of_type("AWS::SecretsManager::Secret").items():
        props = resource.get("Properties", {})
        length = int((props.get("GenerateSecretString") or {}).get("PasswordLength", 32))
        created = client.create_secret(
            Name=f"{description.stack_name}-{name}",
            Description=str(props.get("Description", "")),
            SecretString=secrets.token_urlsafe(length)[:length],
        )
        description.refs[name] = created["ARN"]
        description.attributes[f"{name}.Id"] = created["ARN"]


def _describe_unprovisioned(description: StackDescription, template: Template) -> None:
    """Names for the resources the local stack emulates itself, so references to them resolve."""
    region = description.region
    for name, resource in template.resources.items():
        if name in description.refs:
            continue
        if resource["Type"] == "AWS::Serverless::Function":
            function_name = f"{description.stack_name}-{name}"
            description.refs[name] = function_name
            description.attributes[f"{name}.Arn"] = (
                f"arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{function_name}"
            )
        else:
            description.refs[name] = f"{description.stack_name}-{name}".lower()
