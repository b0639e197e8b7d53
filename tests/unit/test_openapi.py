"""The OpenAPI document served at /v1/openapi.json matches the routes the template deploys."""

from __future__ import annotations

import json

from spool import openapi
from spool.devstack.template import Template
from tests.support import ROOT


def test_the_served_document_is_current() -> None:
    assert openapi.OUTPUT.read_text() == openapi.render(), "stale: run `make openapi` and commit it"


def test_every_deployed_route_is_documented_and_nothing_else() -> None:
    template = Template.load(ROOT / "template.yaml")
    deployed = {
        event.path
        for function in template.functions().values()
        for event in function.api_events
        if event.path.startswith("/v1/")
    }
    document = json.loads(openapi.OUTPUT.read_text())
    assert set(document["paths"]) == deployed


def test_bodies_and_errors_are_described() -> None:
    document = json.loads(openapi.OUTPUT.read_text())
    create = document["paths"]["/v1/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequest"
    }
    assert any(p["name"] == "Idempotency-Key" and p["required"] for p in create["parameters"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }, (method, path)
            assert ("security" in operation) != (path in {"/v1/health", "/v1/openapi.json"}), (method, path)
