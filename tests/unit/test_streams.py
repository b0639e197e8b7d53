"""The local DynamoDB Streams event source: Lambda's filter patterns, and the job log of `make dev`."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from spool.devstack.streams import JobTransitions, matches
from spool.devstack.template import Template
from tests.support import ROOT

LIVE = {"dynamodb": {"NewImage": {"live": {"BOOL": [True]}}}}


def record(pk: str, **image: Any) -> dict[str, Any]:
    return {"eventName": "MODIFY", "dynamodb": {"Keys": {"pk": {"S": pk}}, "NewImage": image}}


def test_the_fanout_reads_the_chunk_stream_in_order_and_only_live_records() -> None:
    (event,) = Template.load(ROOT / "template.yaml").functions()["FanoutFunction"].stream_events
    assert event.table == "ChunksTable" and event.filters == (LIVE,)
    chunk = {"sequence_id": {"N": "3"}, "text": {"S": "x"}}
    assert matches(LIVE, record("t#job#1", **chunk, live={"BOOL": True}))
    assert not matches(LIVE, record("t#job#1", **chunk))  # a job nobody subscribed to: no invocation
    assert not matches(LIVE, record("t#job#1", **chunk, live={"BOOL": False}))
    assert not matches(LIVE, {"eventName": "REMOVE", "dynamodb": {"Keys": {}}})
    resources = Template.load(ROOT / "template.yaml").body["Resources"]
    properties = resources["FanoutFunction"]["Properties"]["Events"]["Chunks"]["Properties"]
    assert properties["ParallelizationFactor"] == 1  # one batch of a shard at a time, in order


def test_exists_and_prefix_rules() -> None:
    assert matches({"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "t#job#"}]}}}}, record("t#job#1"))
    assert not matches({"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "t#idem#"}]}}}}, record("t#job#1"))
    assert matches({"dynamodb": {"OldImage": [{"exists": False}]}}, record("t#job#1"))
    with pytest.raises(ValueError, match="unsupported"):
        matches({"dynamodb": {"Keys": [{"numeric": [">", 1]}]}}, record("t#job#1"))


def test_job_transitions_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    log = JobTransitions(logging.getLogger("test.jobs"))
    queued = record("acme#job#job_1", status={"S": "queued"}, model_resolved={"S": "sim-fast"})
    running = record("acme#job#job_1", status={"S": "running"}, attempts={"N": "1"})
    done = record(
        "acme#job#job_1",
        status={"S": "failed"},
        attempts={"N": "1"},
        usage={"M": {"output_tokens": {"N": "12"}}},
        cost_nanos={"N": "4800"},
        error={"M": {"code": {"S": "provider_error"}}},
    )
    with caplog.at_level(logging.INFO, logger="test.jobs"):
        log([queued, record("acme#idem#abc", status={"S": "x"}), running, running])
        log([running, done])
    assert [r.getMessage() for r in caplog.records] == [
        "job job_1 queued (tenant acme, sim-fast)",
        "job job_1 running (attempt 1)",
        "job job_1 failed: 12 tokens out, $0.000005 (provider_error)",
    ]
