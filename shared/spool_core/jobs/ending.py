"""How a job ends: what it used, priced per model that produced it, and the structured error of a
failure. Shared by the worker, the dead-letter path and a cancel of a job no worker holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from spool_core.jobs.model import Job, Progress, Segment, Usage
from spool_core.jobs.ports import ChunkLog, JobEnd
from spool_core.limits.model import ModelUsage, Reservation
from spool_core.models import ModelCatalog
from spool_core.observability import logger


def reservation_of(job: Job) -> Reservation | None:
    """What the job's admission reserved (its tokens, cost and slot), for its end to settle."""
    return Reservation.from_item(job.reservation) if job.reservation else None


def first_chunk_at(chunks: ChunkLog, job_id: str) -> str | None:
    """When the job's first chunk (its first token) was written, read from its log."""
    first = chunks.after(job_id, 0, 1)
    return first[0].created_at if first else None


def estimated_input(job: Job) -> int:
    if job.estimate:
        return int(job.estimate.get("input_raw", 0))
    return max(0, job.usage.estimated_tokens - job.request.max_tokens)


def model_usage(
    job: Job,
    tokens_total: int,
    input_reported: Mapping[str, int],
    models: ModelCatalog,
    *,
    output_correction: Mapping[str, int] | None = None,
) -> tuple[ModelUsage, ...]:
    """Per model: the output tokens of its segments of the log and the input tokens its provider
    reported (every call re-reads the prompt), priced at that model. A model that produced output
    without reporting its input (its call was cut short by a crash) is charged the estimate. The
    output is the worker's count of the log's tokens, moved by ``output_correction`` to what the
    provider reported for the calls whose report came (the runner's)."""
    segments = job.segments or [Segment(model=job.model_resolved)]
    outputs: dict[str, int] = {}
    for index, segment in enumerate(segments):
        end = segments[index + 1].from_tokens if index + 1 < len(segments) else tokens_total
        outputs[segment.model] = outputs.get(segment.model, 0) + max(0, end - segment.from_tokens)
    for model_id, correction in (output_correction or {}).items():
        outputs[model_id] = max(0, outputs.get(model_id, 0) + correction)
    lines = []
    for model_id in dict.fromkeys([*(s.model for s in segments), *input_reported]):
        output = outputs.get(model_id, 0)
        used = input_reported.get(model_id, 0) or (estimated_input(job) if output else 0)
        if not used and not output:
            continue
        spec = models.get(model_id)
        if spec is None:
            logger.warning("model left the registry; its tokens are not priced", extra={"model": model_id})
        lines.append(ModelUsage(model_id, used, output, spec.cost_nanos(used, output) if spec else 0))
    # A job that used nothing still ended: it counts once, under the model it ended on.
    return tuple(lines) or (ModelUsage(segments[-1].model, 0, 0, 0),)


def job_end(
    job: Job,
    status: str,
    progress: Progress,
    usage: tuple[ModelUsage, ...],
    completed_at: str,
    *,
    input_reported: Mapping[str, int],
    segments: list[Segment] | None = None,
    output: str | None = None,
    error: dict[str, Any] | None = None,
    first_token_at: str | None = None,
    finish_reason: str | None = None,
    subscribed: bool = False,
) -> JobEnd:
    return JobEnd(
        status=status,  # type: ignore[arg-type]
        progress=progress,
        usage=Usage(
            estimated_tokens=job.usage.estimated_tokens,
            input_tokens=sum(u.input_tokens for u in usage),
            output_tokens=sum(u.output_tokens for u in usage),
        ),
        cost_nanos=sum(u.cost_nanos for u in usage),
        completed_at=completed_at,
        output=output,
        error=error,
        first_token_at=first_token_at,
        segments=tuple(segments) if segments is not None else None,
        input_reported=dict(input_reported),
        finish_reason=finish_reason,
        subscribed=subscribed or job.subscribed,
    )


def end_from_log(
    job: Job,
    status: str,
    chunks: ChunkLog,
    models: ModelCatalog,
    completed_at: str,
    *,
    error: Callable[[Progress], dict[str, Any]] | None = None,
) -> tuple[JobEnd, tuple[ModelUsage, ...]]:
    """The end of a job no attempt holds any more (dead-lettered, or cancelled after its worker died
    or handed it over): what it wrote, read from its chunk log, where its output stays; its first
    token's time from the log too when no attempt lived to record it. Also the usage to settle."""
    last = chunks.last(job.job_id) if job.attempts else None
    progress = Progress.up_to(last)
    first_token_at = job.first_token_at
    if first_token_at is None and last is not None:
        first_token_at = first_chunk_at(chunks, job.job_id)
    usage = model_usage(job, progress.tokens_generated, job.input_reported, models)
    end = job_end(
        job,
        status,
        progress,
        usage,
        completed_at,
        input_reported=job.input_reported,
        error=error(progress) if error else None,
        first_token_at=first_token_at,
    )
    return end, usage


def error_object(
    code: str,
    message: str,
    details: Mapping[str, Any],
    suggestions: list[str],
    progress: Progress,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The error envelope's body, with where the partial output ends. ``request_id``: the invocation
    that ended the job (a worker's or the dead-letter consumer's), whose log says what happened."""
    return {
        "code": code,
        "message": message,
        "details": {
            **details,
            "last_sequence_id": progress.last_sequence_id,
            "tokens_generated": progress.tokens_generated,
        },
        "suggestions": suggestions,
        "request_id": request_id,
    }
