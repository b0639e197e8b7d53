"""Function sizes chosen for cost (issue 16): what each function holds and for how long."""

from __future__ import annotations

import pytest

from spool.devstack.template import Template
from tests.support import ROOT


@pytest.fixture(scope="module")
def template() -> Template:
    return Template.load(ROOT / "template.yaml")


def test_chunk_pages_are_served_by_a_small_function_of_their_own(template: Template) -> None:
    functions = template.functions()
    chunks, jobs = functions["ChunksFunction"], functions["JobsFunction"]
    paths = {e.path for e in chunks.api_events}
    assert paths == {"/v1/jobs/{job_id}/chunks", "/v1/jobs/{job_id}/stream/resume"}
    assert not paths & {e.path for e in jobs.api_events}  # each route has one function
    assert chunks.code_uri == jobs.code_uri  # beside the jobs function's code, in a module of its own
    assert chunks.module_file != jobs.module_file
    assert chunks.memory_mb == 128 < jobs.memory_mb <= 512


def test_event_streams_are_served_by_the_smallest_function_that_holds_a_reader(template: Template) -> None:
    functions = template.functions()
    events, openai = functions["EventsFunction"], functions["StreamFunction"]
    assert [e.path for e in events.api_events] == ["/v1/jobs/{job_id}/events"]
    assert events.code_uri == openai.code_uri  # beside the OpenAI surface's app, in an app of its own
    assert (events.web_app, openai.web_app) == ("events:app", "app:app")
    assert events.memory_mb == 128 < openai.memory_mb  # creating jobs needs tiktoken's memory


def test_every_function_runs_on_arm64(template: Template) -> None:
    assert template.body["Globals"]["Function"]["Architectures"] == ["arm64"]
    layer = template.body["Resources"]["SharedLayer"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    assert "aarch64" in (ROOT / "shared" / "Makefile").read_text()  # the layer's wheels
    adapters = [
        layer
        for spec in template.body["Resources"].values()
        for layer in spec.get("Properties", {}).get("Layers", [])
        if "LambdaAdapterLayer" in str(layer)
    ]
    assert adapters and all("LambdaAdapterLayerArm64" in str(layer) for layer in adapters)


def test_the_worker_is_sized_by_a_parameter_defaulting_to_192_mb(template: Template) -> None:
    assert template.functions()["WorkerFunction"].memory_mb == 192
    template.overrides = {"WorkerMemorySize": "1024"}
    try:
        assert template.functions()["WorkerFunction"].memory_mb == 1024
    finally:
        template.overrides = {}
