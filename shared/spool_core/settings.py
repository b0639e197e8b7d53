"""The deployment's settings, parsed from the environment at invocation (template.yaml sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spool_core.errors import ConfigurationError
from spool_core.jobs.cadence import Cadence


def blank_is_none(value: Any) -> Any:
    """An optional setting's value, None when it is blank, "none" or a zero ("0", "0.0", "00": how a
    template's empty or zero parameter reaches a function)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "none")):
        return None
    try:
        return None if float(value) == 0 else value
    except (TypeError, ValueError):
        return value


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    region: str = Field(default="us-east-1", alias="AWS_REGION")
    # Set only off AWS (the embedded stack, tests): boto3 then talks to this endpoint.
    endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")
    api_keys_table: str = Field(alias="SPOOL_API_KEYS_TABLE")
    contexts_table: str = Field(alias="SPOOL_CONTEXTS_TABLE")
    jobs_table: str = Field(alias="SPOOL_JOBS_TABLE")
    chunks_table: str = Field(alias="SPOOL_CHUNKS_TABLE")
    bucket: str = Field(alias="SPOOL_BUCKET")
    jobs_queue_url: str = Field(alias="SPOOL_JOBS_QUEUE_URL")
    dead_letter_queue_url: str = Field(alias="SPOOL_DEAD_LETTER_QUEUE_URL")
    websocket_url: str | None = Field(default=None, alias="SPOOL_WEBSOCKET_URL")
    events_secret_arn: str | None = Field(default=None, alias="SPOOL_EVENTS_SECRET_ARN")
    stream_max_seconds: float = Field(default=840, gt=0, alias="SPOOL_STREAM_MAX_SECONDS")
    # under the OpenAI SDKs' default 600 s timeout (a client that gave up first would retry: a new job)
    # and under API Gateway's 5-minute idle timeout of a streamed response (nothing is sent meanwhile)
    answer_max_seconds: float = Field(default=270, gt=0, alias="SPOOL_ANSWER_MAX_SECONDS")
    stream_ping_seconds: float = Field(default=15, gt=0, alias="SPOOL_STREAM_PING_SECONDS")
    max_context_bytes: int = Field(default=50 * 1024 * 1024, gt=0, alias="SPOOL_MAX_CONTEXT_BYTES")
    # 2,000 small files take ~10 s locally (moto), 10,000 outlived the 29 s integration timeout
    max_context_files: int = Field(default=2_000, gt=0, alias="SPOOL_MAX_CONTEXT_FILES")
    blob_retention_days: int = Field(default=9, ge=8, alias="SPOOL_BLOB_RETENTION_DAYS")
    # The chunk cadence (spool_core.jobs.cadence): the first token at once, then every 200 ms or 64
    # tokens, whichever first (DESIGN.md). Writers and readers (which look for the next chunk when it
    # is due) read the same settings.
    flush_ms: int = Field(default=200, ge=1, alias="SPOOL_FLUSH_MS")
    # None: a flat cadence, every SPOOL_FLUSH_MS (DESIGN.md). Set above it, the interval doubles up to it.
    flush_max_ms: int | None = Field(default=None, ge=1, alias="SPOOL_FLUSH_MAX_MS")
    flush_tokens: int = Field(default=64, ge=1, alias="SPOOL_FLUSH_TOKENS")
    # The job lease follows the queue's visibility timeout: a crashed job's message returns as its lease ends.
    lease_seconds: float = Field(default=30, gt=0, alias="SPOOL_LEASE_SECONDS")
    # A queued job whose message never left (a crash between admission and the send) is queued again
    # by the sweeper after this long.
    requeue_queued_after_seconds: int = Field(default=120, ge=10, alias="SPOOL_REQUEUE_QUEUED_AFTER_SECONDS")
    simulator_faults: bool = Field(default=False, alias="SPOOL_SIMULATOR_FAULTS")
    # A provider's stream that sends nothing for this long is retried from what was persisted (a model's
    # first token after a long prompt included: a 128k-token prefill takes seconds, not a minute).
    provider_stall_seconds: float = Field(default=60, gt=0, alias="SPOOL_PROVIDER_STALL_SECONDS")
    usage_table: str = Field(alias="SPOOL_USAGE_TABLE")
    system_table: str = Field(alias="SPOOL_SYSTEM_TABLE")
    connections_table: str = Field(alias="SPOOL_CONNECTIONS_TABLE")
    websocket_management_url: str | None = Field(default=None, alias="SPOOL_WEBSOCKET_MANAGEMENT_URL")
    flags_appconfig: str | None = Field(default=None, alias="SPOOL_FLAGS_APPCONFIG")
    flags_file: str | None = Field(default=None, alias="SPOOL_FLAGS_FILE")
    circuit_threshold: int = Field(default=5, ge=1, alias="SPOOL_CIRCUIT_FAILURES")
    circuit_window_seconds: float = Field(default=60, gt=0, alias="SPOOL_CIRCUIT_WINDOW_SECONDS")
    circuit_cooldown_seconds: float = Field(default=30, gt=0, alias="SPOOL_CIRCUIT_COOLDOWN_SECONDS")
    # How long a job whose every model has its circuit open waits for a probe before it fails (0: it
    # fails at once, as it did before jobs waited).
    circuit_wait_seconds: float = Field(default=300, ge=0, alias="SPOOL_CIRCUIT_WAIT_SECONDS")
    bedrock_endpoint_url: str | None = Field(default=None, alias="SPOOL_BEDROCK_ENDPOINT_URL")
    openai_base_url: str = Field(default="https://api.openai.com/v1", alias="SPOOL_OPENAI_BASE_URL")
    openai_api_key_parameter: str | None = Field(default=None, alias="SPOOL_OPENAI_API_KEY_PARAMETER")
    deep_health_cache_seconds: float = Field(default=60, ge=0, alias="SPOOL_DEEP_HEALTH_CACHE_SECONDS")
    default_tokens_per_minute: int = Field(default=200_000, gt=0, alias="SPOOL_DEFAULT_TOKENS_PER_MINUTE")
    default_tokens_per_day: int = Field(default=10_000_000, gt=0, alias="SPOOL_DEFAULT_TOKENS_PER_DAY")
    default_max_concurrent_jobs: int = Field(default=16, gt=0, alias="SPOOL_DEFAULT_MAX_CONCURRENT_JOBS")
    default_daily_budget_usd: float | None = Field(default=None, gt=0, alias="SPOOL_DEFAULT_DAILY_BUDGET_USD")

    @field_validator(
        "default_daily_budget_usd",
        "flags_appconfig",
        "flags_file",
        "openai_api_key_parameter",
        "bedrock_endpoint_url",
        "events_secret_arn",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return blank_is_none(value)

    @property
    def cadence(self) -> Cadence:
        return Cadence(
            first_ms=self.flush_ms,
            max_ms=max(self.flush_max_ms or 0, self.flush_ms),
            tokens=self.flush_tokens,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        try:
            return cls.model_validate(dict(source))
        except ValidationError as exc:
            missing = sorted(str(err["loc"][0]) for err in exc.errors())
            raise ConfigurationError(
                "The function is missing required settings",
                details={"missing": missing},
                suggestions=["Set these environment variables in template.yaml (Globals) and redeploy"],
            ) from exc
