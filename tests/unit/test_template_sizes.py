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
    assert chunks.module_file == jobs.module_file  # the same app, sized for a reader that waits
    assert chunks.memory_mb <= 256 < jobs.memory_mb <= 512


def test_the_worker_is_sized_by_a_parameter_defaulting_to_256_mb(template: Template) -> None:
    assert template.functions()["WorkerFunction"].memory_mb == 256
    template.overrides = {"WorkerMemorySize": "1024"}
    try:
        assert template.functions()["WorkerFunction"].memory_mb == 1024
    finally:
        template.overrides = {}
