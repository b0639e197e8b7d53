"""Usage metrics leave the process as CloudWatch EMF, one metric per line, dimensioned by model."""

from __future__ import annotations

import json

import pytest

from spool_core.observability import record_usage


def test_tokens_and_cost_are_emitted_as_emf_by_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    record_usage("sim-fast", 120, 80, 0.000044)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    values = {
        name: line[name]
        for line in lines
        for name in ("InputTokens", "OutputTokens", "CostUSD")
        if name in line
    }
    assert values == {"InputTokens": [120.0], "OutputTokens": [80.0], "CostUSD": [0.000044]}
    for line in lines:
        assert line["model"] == "sim-fast"
        directive = line["_aws"]["CloudWatchMetrics"][0]
        assert directive["Namespace"] == "Spool"
        assert directive["Dimensions"] == [["model", "service"]]
