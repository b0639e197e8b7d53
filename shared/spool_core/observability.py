"""The one place that creates Powertools' logger, tracer and metrics.

Their settings (service name, namespace, log level, sampling) come from the ``POWERTOOLS_*``
variables in template.yaml's Globals, so every function reports the same way.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
tracer = Tracer()
metrics = Metrics()

__all__ = ["logger", "metrics", "tracer"]
