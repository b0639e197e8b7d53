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


def test_each_route_documents_the_statuses_it_succeeds_with() -> None:
    """DESIGN.md: a job is accepted with 202, a context and an upload created with 201, a context
    deleted with 204. The document said 200 for each, so a client generated from it (or a schema
    checker) took every one of those answers for an error."""
    document = json.loads(openapi.OUTPUT.read_text())

    def success(path: str, method: str) -> set[str]:
        responses = document["paths"][path][method]["responses"]
        return {code for code in responses if code.startswith("2")}

    assert success("/v1/jobs", "post") == {"202", "200"}
    assert success("/v1/contexts", "post") == success("/v1/contexts/uploads", "post") == {"201"}
    assert success("/v1/contexts/{context_id}", "delete") == {"204"}
    assert "content" not in document["paths"]["/v1/contexts/{context_id}"]["delete"]["responses"]["204"]
    assert success("/v1/contexts/{context_id}", "patch") == success("/v1/jobs/{job_id}", "get") == {"200"}
