"""The one place that creates Powertools' logger, tracer and metrics.

Their settings (service name, namespace, log level, sampling) come from the ``POWERTOOLS_*``
variables in template.yaml's Globals, so every function reports the same way.

The tracer is created on first use (``from spool_core.observability import tracer``), not when this
module is imported: the X-Ray SDK's recorder costs ~0.2 s to import (it builds two botocore clients
for its sampling rules), and a function that never traces (the authorizer) should not pay it. Where
tracing is off (``POWERTOOLS_TRACE_DISABLED``, outside Lambda, SAM local) the tracer gets a provider
that records nothing, so the X-Ray SDK is not imported at all; with tracing on it is X-Ray's, as
Powertools would choose.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Generator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.tracing.base import BaseProvider, BaseSegment

logger = Logger()
metrics = Metrics()

if TYPE_CHECKING:
    tracer: Tracer  # created by __getattr__ on first use


class _NoSegment(BaseSegment):
    """The subsegment of a tracer that records nothing."""

    def close(self, end_time: int | None = None) -> None:
        return None

    def add_subsegment(self, subsegment: Any) -> None:
        return None

    def remove_subsegment(self, subsegment: Any) -> None:
        return None

    def put_annotation(self, key: str, value: Any) -> None:
        return None

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        return None

    def add_exception(self, exception: BaseException, stack: Any, remote: bool = False) -> None:
        return None


class NoTracing(BaseProvider):
    """A Powertools tracing provider that records nothing: the tracer's provider where tracing is
    off, instead of the X-Ray recorder (which Powertools imports even to disable it)."""

    @contextmanager
    def in_subsegment(self, name: Any = None, **kwargs: Any) -> Generator[BaseSegment, None, None]:
        yield _NoSegment()

    @asynccontextmanager
    async def in_subsegment_async(self, name: Any = None, **kwargs: Any) -> AsyncGenerator[BaseSegment, None]:
        yield _NoSegment()

    def put_annotation(self, key: str, value: Any) -> None:
        return None

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        return None

    def patch(self, modules: Sequence[str]) -> None:
        return None

    def patch_all(self) -> None:
        return None


def tracing_disabled() -> bool:
    """Powertools' own rule (``Tracer._is_tracer_disabled``): the switch, or not running in Lambda
    (no ``LAMBDA_TASK_ROOT``), or in SAM local or Chalice local."""
    return bool(Tracer._is_tracer_disabled())


def create_tracer() -> Tracer:
    if tracing_disabled():
        return Tracer(disabled=True, provider=NoTracing())
    return Tracer()


def __getattr__(name: str) -> Any:
    """``tracer`` on first use (PEP 562), then an ordinary module attribute."""
    if name == "tracer":
        created = globals()["tracer"] = create_tracer()
        return created
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
