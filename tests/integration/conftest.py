"""Integration tier: a moto server provisioned from template.yaml, handlers invoked in-process with
the events of events/ and the environment the template gives them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from spool.devstack.provision import MotoServer, StackDescription, provision
from spool.devstack.runtime import LocalFunction
from spool.devstack.stack import local_overrides
from spool.devstack.template import Template
from tests.support import ROOT

DEV_KEY = "sk-integration"
DEV_TENANT = "local"
OTHER_KEY = "sk-other"
OTHER_TENANT = "other"


@pytest.fixture(scope="session")
def template() -> Template:
    return Template.load(ROOT / "template.yaml")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(template: Template, moto_server: MotoServer) -> Iterator[StackDescription]:
    """The template's resources on moto, and os.environ as the functions would see it."""
    description = provision(
        template,
        moto_server.url,
        stack_name="spool-it",
        overrides={"WorkerVisibilityTimeoutSeconds": "1", "MaxReceiveCount": "2"},
    )
    description.overrides = local_overrides({}, template)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in description.environment(template).items():
            patch.setenv(name, value)
        from spool_core import bootstrap
        from spool_core.tenancy import Tenant

        bootstrap.api_keys().register(DEV_KEY, Tenant(DEV_TENANT))
        bootstrap.api_keys().register(OTHER_KEY, Tenant(OTHER_TENANT))
        yield description


@pytest.fixture(scope="session")
def functions(template: Template, stack: StackDescription) -> Iterator[dict[str, LocalFunction]]:
    """Each function as the local runtime runs it: containers in their own processes, with the
    function's environment from the template."""
    resolver = stack.resolver()
    functions = {
        name: LocalFunction(
            spec,
            ROOT,
            region=stack.region,
            name=resolver.ref(name),
            environment=stack.environment_for(template, name),
        )
        for name, spec in template.functions().items()
    }
    yield functions
    for function in functions.values():
        function.shutdown()


@pytest.fixture
def invoke(functions: dict[str, LocalFunction], template: Template, stack: StackDescription) -> Iterator[Any]:
    """Invoke a function; ``environment`` runs it as a function configured with those variables
    changed (a new function configuration, with its own containers, as on Lambda)."""
    configured: list[LocalFunction] = []

    def run(function: str, event: dict[str, Any], environment: dict[str, str] | None = None) -> Any:
        if not environment:
            return functions[function].invoke(event)
        base = functions[function]
        variant = LocalFunction(
            base.spec,
            ROOT,
            region=stack.region,
            name=base.name,
            environment={**stack.environment_for(template, function), **environment},
        )
        configured.append(variant)
        return variant.invoke(event)

    yield run
    for variant in configured:
        variant.shutdown()


def client(service: str, stack: StackDescription) -> Any:
    return boto3.session.Session().client(service, endpoint_url=stack.endpoint_url, region_name=stack.region)


def drain_dead_letters(stack: StackDescription) -> None:
    """Delete every visible message of the dead-letter queue (PurgeQueue is allowed once a minute)."""
    sqs, url = client("sqs", stack), stack.refs["JobsDeadLetterQueue"]
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


@pytest.fixture
def environ() -> dict[str, str]:
    return dict(os.environ)
