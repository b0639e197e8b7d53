"""Where the admin commands (``spool keys``, ``spool limits``) write: a deployed stack, found through
CloudFormation by its name, or the local stack, which tells its AWS endpoint and table names itself."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spool.client import SpoolError

if TYPE_CHECKING:
    from spool_core.limits.model import TenantLimits

LOCAL_INFO_PATH = "/_spool/stack"
# The template's parameters that set the default limits (in TenantLimits' order)
LIMIT_PARAMETERS = (
    "DefaultTokensPerMinute",
    "DefaultTokensPerDay",
    "DefaultMaxConcurrentJobs",
    "DefaultDailyBudgetUsd",
)
LOCAL_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}


class AdminError(SpoolError):
    """The admin target could not be reached or resolved."""

    def __init__(self, message: str, suggestions: list[str]) -> None:
        super().__init__(
            400, {"error": {"code": "admin_target", "message": message, "suggestions": suggestions}}
        )


@dataclass
class AdminTarget:
    description: str
    client_args: dict[str, Any]
    resources: dict[str, str]
    stack_name: str | None = None
    defaults: TenantLimits | None = None  # the local stack says them; a deployed stack's are read once

    def limit_defaults(self) -> TenantLimits:
        """The deployment's default limits: what a tenant without limits of its own has, and what
        `spool limits` moves a tenant from or back to. A deployed stack's are its parameters (the
        template passes them to every function's environment)."""
        if self.defaults is None:
            from spool_core.limits.model import TenantLimits
            from spool_core.settings import blank_is_none
            from spool_core.units import nanos

            stacks = self.client("cloudformation").describe_stacks(StackName=self.stack_name)["Stacks"]
            values = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stacks[0].get("Parameters", [])}
            missing = [name for name in LIMIT_PARAMETERS if name not in values]
            if missing:
                raise AdminError(
                    f"{self.description} has no {', '.join(missing)} parameter: it was deployed from an"
                    " older template, and its default limits cannot be read",
                    ["Deploy this version of the template (sam build && sam deploy), then run this again"],
                )
            per_minute, per_day, concurrent, budget = (values[name] for name in LIMIT_PARAMETERS)
            budget = blank_is_none(budget)
            self.defaults = TenantLimits(
                int(per_minute), int(per_day), int(concurrent), nanos(float(budget)) if budget else None
            )
        return self.defaults

    def client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session().client(service, **self.client_args)  # type: ignore[call-overload]

    def resource(self, logical_id: str) -> str:
        if logical_id in self.resources:
            return self.resources[logical_id]
        cloudformation = self.client("cloudformation")
        found = cloudformation.describe_stack_resource(
            StackName=self.stack_name, LogicalResourceId=logical_id
        )
        physical: str = found["StackResourceDetail"]["PhysicalResourceId"]
        self.resources[logical_id] = physical
        return physical


def resolve(url: str, stack_name: str | None, endpoint_url: str | None = None) -> AdminTarget:
    """``--stack-name`` names a deployed stack (AWS credentials and region as boto3 finds them);
    without it, the local stack answering at ``url``."""
    if stack_name:
        return _deployed(stack_name, endpoint_url)
    try:
        with urllib.request.urlopen(url.rstrip("/") + LOCAL_INFO_PATH, timeout=3) as response:  # noqa: S310
            info = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        raise AdminError(
            f"No local Spool stack answers at {url}",
            [
                "Start the local stack with `make dev` (or point --url / SPOOL_URL at it)",
                "For a deployed stack, name it: --stack-name <stack>",
            ],
        ) from None
    from spool_core.limits.model import TenantLimits

    return AdminTarget(
        f"the local stack at {url}",
        {"endpoint_url": info["endpoint_url"], "region_name": info["region"], **LOCAL_CREDENTIALS},
        dict(info["resources"]),
        info.get("stack_name"),
        # a stack started before it said its defaults: read off its local CloudFormation stack instead
        TenantLimits(**info["limit_defaults"]) if "limit_defaults" in info else None,
    )


def _deployed(stack_name: str, endpoint_url: str | None) -> AdminTarget:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    args: dict[str, Any] = {"endpoint_url": endpoint_url} if endpoint_url else {}
    target = AdminTarget(f"stack {stack_name}", args, {}, stack_name)
    try:
        session = boto3.session.Session()
        if session.region_name is None and "region_name" not in args:
            raise NoRegionError
        target.resource("ApiKeysTable")  # reachable, and the stack exists
    except (NoRegionError, NoCredentialsError):
        raise AdminError(
            f"No AWS credentials or region to reach stack {stack_name}",
            [
                "Configure them (aws configure, or AWS_PROFILE / AWS_REGION)",
                "For the local stack, omit --stack-name",
            ],
        ) from None
    except (ClientError, BotoCoreError) as exc:
        raise AdminError(
            f"Stack {stack_name} could not be read: {exc}",
            ["Check the stack name (sam deploy prints it) and the region"],
        ) from None
    return target


@contextmanager
def aws_errors(target: AdminTarget) -> Iterator[None]:
    """What AWS answers while an admin command works on ``target`` (missing credentials or region,
    access denied, a table that is not there, an endpoint that does not answer), as one ``AdminError``
    line with what to do, instead of botocore's traceback."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
    )

    try:
        yield
    except (NoRegionError, NoCredentialsError):
        raise AdminError(
            f"No AWS credentials or region to reach {target.description}",
            [
                "Configure them (aws configure, or AWS_PROFILE / AWS_REGION)",
                "For the local stack, omit --stack-name",
            ],
        ) from None
    except EndpointConnectionError as exc:
        raise AdminError(
            f"{target.description} could not be reached: {exc}",
            [
                "Is the stack running? Start the local one with `make dev`",
                "Check --endpoint-url and the region",
            ],
        ) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise AdminError(
            f"AWS refused the change to {target.description}: {error.get('Code', 'ClientError')}: "
            f"{error.get('Message', exc)}",
            ["Check that your credentials may read and write the stack's tables", "Check --stack-name"],
        ) from None
    except BotoCoreError as exc:
        raise AdminError(
            f"AWS call to {target.description} failed: {exc}", ["Retry with --debug for the detail"]
        ) from None
