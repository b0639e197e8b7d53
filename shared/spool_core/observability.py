"""The one place that creates Powertools' logger, tracer and metrics.

Their settings (service name, namespace, log level, sampling) come from the ``POWERTOOLS_*``
variables in template.yaml's Globals, so every function reports the same way.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric

logger = Logger()
tracer = Tracer()
metrics = Metrics()


def record_usage(model_id: str, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
    """Tokens in, tokens out and cost of one job, by model, as CloudWatch EMF."""
    if os.environ.get("POWERTOOLS_METRICS_DISABLED", "").lower() in {"1", "true", "yes", "on"}:
        return  # single_metric, unlike Metrics, does not read the switch itself
    for name, unit, value in (
        ("InputTokens", MetricUnit.Count, input_tokens),
        ("OutputTokens", MetricUnit.Count, output_tokens),
        ("CostUSD", MetricUnit.NoUnit, cost_usd),
    ):
        with single_metric(name=name, unit=unit, value=value) as metric:
            metric.add_dimension(name="model", value=model_id)


__all__ = ["logger", "metrics", "record_usage", "tracer"]
