"""Least privilege that works: every AWS call a function makes, in a user's whole tour of the API,
is allowed by that function's role in template.yaml.

The local stack does not enforce IAM, so a role missing an action shows only on AWS (the WebSocket
function could not mark a job subscribed, the contexts function could not count an upload). Here a
stack runs with ``aws_calls_hook`` on its ``PYTHONPATH``: each container records the calls it makes
(the operation and the table, index, queue, bucket or secret it names; a transaction's items one by
one), and each is checked against the grants of the function's policies (or its role), as
tests/unit/test_template_policy.py reads them."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from spool import Client
from spool.devstack.template import Template
from tests.e2e.conftest import DEV_KEY, RunningStack, start_stack, stop_stack
from tests.support import ROOT
from tests.unit.test_template_policy import Grant, _grants

HOOK = Path(__file__).with_name("aws_calls_hook")
# An S3 or SQS call's action, where it is not the operation's own name.
ACTIONS = {
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "HeadBucket"): "s3:ListBucket",
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "DeleteObjects"): "s3:DeleteObject",
    ("s3", "CopyObject"): "s3:PutObject",
    ("apigatewaymanagementapi", "PostToConnection"): "execute-api:ManageConnections",
    ("apigatewaymanagementapi", "DeleteConnection"): "execute-api:ManageConnections",
}
OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, Path]]:
    calls = tmp_path_factory.mktemp("aws-calls")
    path = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH", "")]))
    stack = start_stack({"PYTHONPATH": path, "SPOOL_TEST_AWS_CALLS": str(calls)})
    yield stack, calls
    stop_stack(stack)


def tour(stack: RunningStack) -> None:
    """What a user does: contexts (direct, patched, uploaded out of band, listed, deleted), jobs read
    every way (SSE, WebSocket, long-poll), cancelled, listed; the OpenAI-compatible surface; usage,
    models, token counts, the deep health check."""
    client = Client(stack.base_url, DEV_KEY)
    context = client.create_context([{"path": "a.py", "content": "x = 1\n"}])
    client.patch_context(context["context_id"], upsert=[{"path": "b.py", "content": "y = 2\n"}])
    status, _, ticket = client.request("POST", "/v1/contexts/uploads")
    assert status == 201
    put = urllib.request.Request(  # noqa: S310 - the local stack's presigned URL
        ticket["upload_url"], data=b'{"files": [{"path": "c.txt", "content": "out of band"}]}', method="PUT"
    )
    put.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(put, timeout=30) as response:  # noqa: S310
        assert response.status == 200
    uploaded = client.request("POST", "/v1/contexts", {"upload_id": ticket["upload_id"]})[2]
    client.list_contexts()
    for transport in ("sse", "websocket", "poll"):
        job = client.create_job(
            "Explain a.py", model="sim-fast", max_tokens=40, context_id=context["context_id"]
        )
        assert "".join(client.stream(job["job_id"], transport=transport))
    # streams longer than their key check's interval (5 s), which reads the key table
    slow = client.create_job("Read for a while", model="sim-realtime", max_tokens=350)
    assert "".join(client.stream(slow["job_id"], transport="sse"))
    chat = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)
    streamed = chat.chat.completions.create(
        model="sim-realtime", messages=[{"role": "user", "content": "hi"}], max_tokens=350, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    linked = client.create_job("Read by its link", model="sim-fast", max_tokens=20)
    # links.events: no key, a token whose key the authorizer looks up by its id
    with urllib.request.urlopen(linked["links"]["events"], timeout=60) as response:  # noqa: S310 - loopback
        assert b"event: done" in response.read()
    long = client.create_job("A long answer", model="sim-realtime", max_tokens=400)
    client.chunks(long["job_id"], wait=5)
    client.cancel(long["job_id"])
    client.request("GET", "/v1/jobs?limit=5")
    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)
    sdk.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    response = sdk.responses.create(model="sim-fast", input="hi", max_output_tokens=5, background=True)
    sdk.responses.retrieve(response.id)
    sdk.models.retrieve("sim-fast")
    client.usage()
    client.models()
    client.request(
        "POST", "/v1/tokens/count", {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}]}
    )
    client.health(deep=True)
    client.delete_context(uploaded["context_id"])


def owner(function: str, template: Template) -> str:
    """The template resource whose policies a function's calls need: its role, if it names one."""
    role = template.resources[function]["Properties"].get("Role")
    return role["Fn::GetAtt"][0] if isinstance(role, dict) and "Fn::GetAtt" in role else function


def logical(physical: str | None, template: Template) -> str | None:
    """The template resource a local physical name (``<stack>-<LogicalId>-<suffix>``, a queue's URL,
    a secret's ARN) belongs to."""
    if physical is None:
        return None
    name = physical.rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    found = [r for r in template.resources if f"-{r.lower()}-" in f"{name}-"]
    return max(found, key=len) if found else None


def allowed(call: dict[str, Any], grants: list[Grant], template: Template) -> bool:
    service, operation = call["service"], call["operation"]
    action = ACTIONS.get((service, operation), f"{service}:{operation}")
    resource = logical(call["resource"], template)
    for grant in grants:
        if grant.action != action:
            continue
        if resource is None:  # no resource-level permission (or none named): any grant of the action
            return True
        arn = f"${{{resource}.Arn}}"
        if call["index"]:
            names = {f"{arn}/index/{call['index']}", f"{arn}/index/*"}
        elif action in OBJECT_ACTIONS:
            names = {grant.resource} if grant.resource.startswith(f"{arn}/") else set()
        else:
            names = {arn, f"${{{resource}}}"}
        if grant.resource in names:
            return True
    return False


def test_every_call_of_a_users_tour_is_allowed_by_the_functions_role(
    recorded: tuple[RunningStack, Path],
) -> None:
    stack, calls = recorded
    tour(stack)
    # the sweeper runs every minute from the stack's start: its queries of both indexes, once at least
    deadline = time.monotonic() + 150
    while not any(
        "SweeperFunction" in line for f in calls.glob("*.jsonl") for line in f.read_text().splitlines()
    ):
        assert time.monotonic() < deadline, "the sweeper did not run"
        time.sleep(1)
    template = Template.load(ROOT / "template.yaml")
    functions = [n for n, r in template.resources.items() if r["Type"] == "AWS::Serverless::Function"]
    grants: dict[str, list[Grant]] = {}
    for grant in _grants(template):
        grants.setdefault(grant.owner, []).append(grant)
    seen: set[str] = set()
    refused: set[str] = set()
    for file in calls.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            call = json.loads(line)
            function = max((f for f in functions if call["function"].endswith(f)), key=len)
            seen.add(function)
            if not allowed(call, grants.get(owner(function, template), []), template):
                what = f"{call['service']}.{call['operation']} on {call['resource']} {call['index'] or ''}"
                refused.add(f"{function}: {what}")
    assert {
        "JobsFunction",
        "ChunksFunction",
        "EventsFunction",
        "WorkerFunction",
        "WebSocketFunction",
        "FanoutFunction",
        "ContextsFunction",
        "SweeperFunction",
    } <= seen
    assert sorted(refused) == []
