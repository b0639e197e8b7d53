"""Composition root: the one module that wires the AWS adapters to the logic.

Handlers ask it for a ready service at invocation. Clients are created on first use and reused by
warm invocations; nothing touches the network at import time. Tests build the same services from
in-memory fakes instead.

Every function imports this module, so it imports almost nothing itself: each factory imports the
adapters and services it wires, when it is first called. A function then loads only what its own
routes use, and none loads the ``openai`` SDK, Powertools Parameters or AppConfig until a call needs
them (see docs/decisions.md, cold start). The key lookup too: most functions never authenticate a
key; the authorizer and the fanout, which use it on every call, import it themselves.
``tests/unit/test_cold_imports.py`` keeps it so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from spool_core import snapshot  # noqa: F401 - registers the SnapStart hooks (none runs at import)
from spool_core.adapters import aws
from spool_core.errors import ConfigurationError
from spool_core.settings import Settings
from spool_core.tenancy import Tenant, TenantScope

if TYPE_CHECKING:
    import ssl

    import openai
    from aws_lambda_powertools.utilities.parameters import SecretsProvider

    from spool_core.adapters.jobs import DynamoChunkLog, DynamoJobStore, DynamoRetryKeys, SqsJobQueue
    from spool_core.adapters.usage import DynamoUsageStore
    from spool_core.adapters.websocket import DynamoConnectionStore
    from spool_core.auth import ApiKeys, ConnectionGuard
    from spool_core.circuits import CircuitBreaker
    from spool_core.contexts.service import ContextService
    from spool_core.due_ends import DueEndSweeper
    from spool_core.events import EventsToken
    from spool_core.flags import Flags
    from spool_core.health import HealthService, Probe
    from spool_core.jobs.dead_letters import DeadLetters
    from spool_core.jobs.pages import ChunkPages
    from spool_core.jobs.ports import RequestStore
    from spool_core.jobs.runner import JobRunner
    from spool_core.jobs.service import JobService
    from spool_core.jobs.sweeper import Sweeper
    from spool_core.limits.model import TenantLimits
    from spool_core.limits.service import RateLimiter
    from spool_core.models import ModelCatalog, ModelSpec
    from spool_core.providers import Provider
    from spool_core.subscriptions import Fanout


def settings() -> Settings:
    return Settings.from_env()


@lru_cache(maxsize=8)
def _api_keys(config: Settings) -> ApiKeys:
    from spool_core.adapters.api_keys import DynamoApiKeyStore
    from spool_core.auth import ApiKeys

    return ApiKeys(DynamoApiKeyStore(aws.dynamodb(config), config.api_keys_table))


def api_keys(config: Settings | None = None) -> ApiKeys:
    return _api_keys(config or settings())


@lru_cache(maxsize=4)
def _connection_guard(config: Settings) -> ConnectionGuard:
    from spool_core.adapters.api_keys import DynamoConnectionKeys, ManagementApiCloser
    from spool_core.auth import ConnectionGuard

    return ConnectionGuard(
        _api_keys(config),
        DynamoConnectionKeys(aws.dynamodb(config), config.connections_table),
        ManagementApiCloser(aws.websocket_management(config)),
    )


def connection_guard(config: Settings | None = None) -> ConnectionGuard:
    """Which WebSocket connections may still receive (their key not revoked); one per execution
    environment, like the key cache it reads through."""
    return _connection_guard(config or settings())


def health_service(config: Settings | None = None, *, deep: bool = False) -> HealthService:
    """Core probes (critical) plus one probe per model provider (not critical: degraded, not down)."""
    from spool_core.adapters.system_cache import DynamoCache
    from spool_core.health import HealthService
    from spool_core.models import registry
    from spool_core.provider_health import provider_probes

    config = config or settings()
    core = _core_probes(config)
    models = [m for m in registry().all() if catalog(None, config).enabled(m)]
    deep = deep and feature_flags(config).enabled("deep_health_checks", default=True)
    providers = provider_probes(
        models,
        circuit_breaker(config),
        deep=deep,
        provider_for=lambda model: provider_for(model, config),
        cache=DynamoCache(aws.dynamodb(config, probe=True), config.system_table),
        cache_seconds=config.deep_health_cache_seconds,
    )
    return HealthService([*core, *providers])


@lru_cache(maxsize=8)
def _core_probes(config: Settings) -> tuple[Probe, ...]:
    from spool_core.adapters import probes
    from spool_core.health import Probe

    tables = (
        config.api_keys_table,
        config.contexts_table,
        config.jobs_table,
        config.chunks_table,
        config.usage_table,
        config.system_table,
    )
    return (
        Probe("dynamodb", partial(probes.dynamodb_tables, aws.dynamodb(config, probe=True), tables)),
        Probe("s3", partial(probes.s3_bucket, aws.s3(config, probe=True), config.bucket)),
        Probe(
            "queue",
            partial(
                probes.sqs_queues,
                aws.sqs(config, probe=True),
                config.jobs_queue_url,
                config.dead_letter_queue_url,
                aws.cloudwatch(config, probe=True),
            ),
        ),
        Probe(
            "dead_letters",
            partial(probes.dead_letters, aws.sqs(config, probe=True), config.dead_letter_queue_url),
            critical=False,
        ),
    )


def context_service(tenant: Tenant, config: Settings | None = None) -> ContextService:
    """The context store as one tenant sees it (every adapter bound to the tenant's scope)."""
    from spool_core.adapters.contexts import (
        DynamoBlobIndex,
        DynamoContextTable,
        S3BlobStore,
        S3ManifestStore,
        S3UploadStore,
    )
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.contexts.service import DAY, ContextLimits, ContextService

    config = config or settings()
    scope = TenantScope(tenant)
    s3, table = aws.s3(config), ScopedTable(aws.dynamodb(config), config.contexts_table, scope)
    return ContextService(
        DynamoContextTable(table),
        S3ManifestStore(s3, config.bucket, scope),
        S3BlobStore(s3, config.bucket, scope),
        DynamoBlobIndex(table),
        S3UploadStore(s3, config.bucket, scope),
        ContextLimits(
            max_bytes=config.max_context_bytes,
            max_files=config.max_context_files,
            blob_retention_seconds=config.blob_retention_days * DAY,
        ),
    )


def request_store(tenant: Tenant, config: Settings | None = None) -> RequestStore:
    """Where the tenant's messages too large for a job item go (S3), made by the first such job."""
    from spool_core.adapters.contexts import S3RequestStore

    config = config or settings()
    return S3RequestStore(aws.s3(config), config.bucket, TenantScope(tenant))


def _job_tables(tenant: Tenant, config: Settings) -> tuple[DynamoJobStore, DynamoChunkLog]:
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.jobs import DynamoChunkLog, DynamoJobStore
    from spool_core.jobs.model import JOB_TTL_SECONDS

    scope = TenantScope(tenant)
    ddb = aws.dynamodb(config)
    chunk_table = ScopedTable(ddb, config.chunks_table, scope)
    jobs = DynamoJobStore(
        ScopedTable(ddb, config.jobs_table, scope),
        ScopedTable(ddb, config.usage_table, scope),
        JOB_TTL_SECONDS,
        chunk_table,
    )
    chunks = DynamoChunkLog(chunk_table, JOB_TTL_SECONDS)
    return jobs, chunks


def retry_keys(tenant: Tenant, config: Settings | None = None) -> DynamoRetryKeys:
    """The keys given to the tenant's OpenAI requests without one, for the SDK's retries of them."""
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.jobs import DynamoRetryKeys

    config = config or settings()
    return DynamoRetryKeys(ScopedTable(aws.dynamodb(config), config.jobs_table, TenantScope(tenant)))


def job_queue(config: Settings | None = None) -> SqsJobQueue:
    from spool_core.adapters.jobs import SqsJobQueue

    config = config or settings()
    return SqsJobQueue(aws.sqs(config), config.jobs_queue_url)


def events_token(config: Settings | None = None) -> EventsToken | None:
    """The signer of ``links.events`` tokens, with the deployment's secret (Secrets Manager, read
    through Powertools Parameters and cached five minutes); None where no secret is configured."""
    config = config or settings()
    if not config.events_secret_arn:
        return None
    from spool_core.events import EventsToken

    return EventsToken(secret_value(config.events_secret_arn, config).encode())


def events_link(
    tenant: Tenant, public_url: str, config: Settings | None = None, key_id: str | None = None
) -> Callable[[str], str] | None:
    """``links.events``: the job's SSE stream with a read-only token that outlives its chunk log, or
    the key it is handed to (``key_id``, the caller's: revoking it ends the token too)."""
    from spool_core.jobs.model import JOB_TTL_SECONDS

    signer = events_token(config)
    if signer is None:
        return None
    expires = int(time.time()) + JOB_TTL_SECONDS + 86_400  # the log's last chunk may be a day younger

    def link(job_id: str) -> str:
        token = signer.sign(tenant.id, job_id, expires, key_id)
        return f"{public_url}/v1/jobs/{job_id}/events?token={token}"

    return link


def chunk_pages(tenant: Tenant, config: Settings | None = None) -> ChunkPages:
    """The tenant's chunk log read a page at a time, and nothing else (``ChunksFunction``)."""
    from spool_core.jobs.pages import ChunkPages

    config = config or settings()
    jobs, chunks = _job_tables(tenant, config)
    return ChunkPages(jobs, chunks, cadence=config.cadence)


def job_service(
    tenant: Tenant,
    config: Settings | None = None,
    *,
    public_url: str | None = None,
    key_id: str | None = None,
) -> JobService:
    from spool_core.jobs.service import JobService

    config = config or settings()
    jobs, chunks = _job_tables(tenant, config)
    return JobService(
        tenant,
        jobs,
        chunks,
        job_queue(config),
        partial(context_service, tenant, config),
        catalog(tenant, config),
        rate_limiter(tenant, config),
        websocket_url=config.websocket_url,
        events_link=events_link(tenant, public_url, config, key_id) if public_url else None,
        cadence=config.cadence,
        requests=partial(request_store, tenant, config),
    )


def provider_for(model: ModelSpec, config: Settings | None = None) -> Provider:
    config = config or settings()
    # Each provider's module (and its SDK: ``openai`` alone is ~0.6 s) is imported by the first call
    # that needs it, not by every function that imports this module.
    if model.provider == "simulated":
        from spool_core.providers.simulated import SimulatedProvider

        return SimulatedProvider(faults_enabled=config.simulator_faults)
    if model.provider == "bedrock":
        from spool_core.providers.bedrock import BedrockProvider

        return BedrockProvider(aws.bedrock(config), supports_prefill=model.family == "anthropic")
    if model.provider == "openai":
        from spool_core.providers import ProviderMisconfigured
        from spool_core.providers.openai_compatible import OpenAICompatibleProvider

        base_url = str(model.options.get("base_url") or config.openai_base_url)
        try:
            key = secret(model.options.get("api_key_parameter") or config.openai_api_key_parameter)
        except ConfigurationError as exc:  # the same at every attempt: not the provider's health
            raise ProviderMisconfigured(
                f"{model.id} cannot be called: {exc.message}", exc.suggestions
            ) from exc
        return OpenAICompatibleProvider(_openai_client(base_url, key))
    raise ValueError(f"no provider named {model.provider!r}")


@lru_cache(maxsize=8)
def _openai_client(base_url: str, api_key: str) -> openai.OpenAI:
    import openai

    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=120.0,
        http_client=openai.DefaultHttpxClient(verify=provider_tls()),
    )


@lru_cache(maxsize=1)
def provider_tls() -> ssl.SSLContext:
    """The TLS context of every OpenAI-compatible provider's HTTP client in this process: each client
    loaded the CA bundle for its own (~30 ms of CPU, on every new container's first job). Made before
    a snapshot (``spool_core.snapshot``). Only the context is shared: each client keeps its own
    connections and cookies, so one upstream's cookies never reach another."""
    import httpx2

    return httpx2.create_ssl_context()


@lru_cache(maxsize=8)
def secrets(config: Settings) -> SecretsProvider:
    """Powertools Parameters' Secrets Manager provider on this process's shared client: its
    ``get_secret`` makes a boto3 session of its own on first use (~0.1-0.2 s of CPU, which every new
    container repeated on its first request); this one is made before a snapshot
    (``spool_core.snapshot``) and shares the session the other clients came from."""
    from aws_lambda_powertools.utilities.parameters import SecretsProvider

    return SecretsProvider(boto3_client=aws.secretsmanager(config))


def secret_value(name: str, config: Settings | None = None) -> str:
    """A Secrets Manager secret's value, cached five minutes."""
    value: Any = secrets(config or settings()).get(name, max_age=300)
    return str(value)


def secret(reference: str | None) -> str:
    """An API key by reference: ``ssm:/name`` (SecureString), ``secretsmanager:name`` or ``env:VAR``,
    read through Powertools Parameters (cached five minutes). Local servers (vLLM, Ollama) need none."""
    if not reference:
        return "not-needed"
    from aws_lambda_powertools.utilities import parameters

    kind, _, name = reference.partition(":")
    if kind in ("ssm", "secretsmanager"):
        ssm = kind == "ssm"
        try:
            value: Any = (
                parameters.get_parameter(name, decrypt=True, max_age=300) if ssm else secret_value(name)
            )
        except parameters.exceptions.GetParameterError as exc:
            # Powertools wraps every failure alike; one that no retry can mend is the deployment's
            code = aws.error_code(exc.__context__)
            if code not in _UNREADABLE:
                raise  # throttled, or the service unreachable: the attempt fails, a later one may not
            what, store = ("parameter", "SSM Parameter Store") if ssm else ("secret", "Secrets Manager")
            raise ConfigurationError(
                f"The API key reference {reference!r} names a {what} the function cannot read ({code})",
                suggestions=[
                    f"Create {name} in {store}, or point the reference at the one that holds the key",
                    "Check that the function's role may read it (and decrypt it with its KMS key)",
                ],
            ) from exc
    elif kind == "env":
        if name not in os.environ:
            raise ConfigurationError(
                f"The API key reference {reference!r} names a variable the function's environment lacks",
                suggestions=[
                    f"Set {name} where the function runs (make dev passes it on when it is set)",
                    "On AWS, keep keys in ssm:/name or secretsmanager:name instead",
                ],
            )
        value = os.environ[name]
    else:  # never quoted: what was set may be the key itself
        raise ConfigurationError(
            "The API key reference is of no known kind: it must begin ssm:, secretsmanager: or env:",
            suggestions=[
                "Use ssm:/parameter/name, secretsmanager:secret-name or env:VARIABLE",
                "If the key itself was set there, keep it in SSM or Secrets Manager and name it instead",
            ],
        )
    return str(value)


# Errors of a parameter or secret read that the deployment's configuration causes, not the moment
_UNREADABLE = frozenset(
    {
        "ParameterNotFound",  # SSM
        "ParameterVersionNotFound",  # ssm:/name:7, a version that is not there
        "InvalidKeyId",  # SSM: the parameter's KMS key is disabled or gone
        "ResourceNotFoundException",  # Secrets Manager
        "DecryptionFailure",  # Secrets Manager: its KMS key cannot decrypt the secret
        "InvalidRequestException",  # Secrets Manager: the secret is scheduled for deletion
        "ValidationException",  # a name the service refuses
        "AccessDeniedException",
        "AccessDenied",
    }
)


def job_runner(tenant: Tenant, config: Settings | None = None) -> JobRunner:
    from spool_core.jobs.runner import JobRunner, RunnerSettings

    config = config or settings()
    jobs, chunks = _job_tables(tenant, config)
    return JobRunner(
        jobs,
        chunks,
        partial(context_service, tenant, config),
        catalog(tenant, config),
        lambda model: provider_for(model, config),
        rate_limiter(tenant, config),
        RunnerSettings(
            cadence=config.cadence,
            lease_ms=int(config.lease_seconds * 1000),
            stall_seconds=config.provider_stall_seconds,
            circuit_wait_seconds=config.circuit_wait_seconds,
        ),
        queue=job_queue(config),
        breaker=_worker_circuit_breaker(config),
        flags=feature_flags(config),
        requests=partial(request_store, tenant, config),
    )


def dead_letters(tenant: Tenant, config: Settings | None = None) -> DeadLetters:
    from spool_core.jobs.dead_letters import DeadLetters

    config = config or settings()
    jobs, chunks = _job_tables(tenant, config)
    return DeadLetters(jobs, chunks, catalog(tenant, config), rate_limiter(tenant, config))


def sweeper(config: Settings | None = None) -> Sweeper:
    """Re-queues forgotten jobs: queued for two minutes, or running with no lease for twice the
    lease (the lease is the queue's visibility timeout) and a minute."""
    from spool_core.adapters.jobs import DynamoPendingJobs
    from spool_core.jobs.sweeper import Sweeper, SweepSettings

    config = config or settings()
    lease_ms = int(config.lease_seconds * 1000)
    return Sweeper(
        DynamoPendingJobs(aws.dynamodb(config), config.jobs_table),
        lambda tenant_id: _job_tables(Tenant(tenant_id), config)[0],
        job_queue(config),
        SweepSettings(
            queued_grace_ms=config.requeue_queued_after_seconds * 1000, running_grace_ms=2 * lease_ms + 60_000
        ),
    )


def due_end_sweeper(config: Settings | None = None) -> DueEndSweeper:
    """Has the end of a job delivered again to a subscriber whose subscribe handler died holding it."""
    from spool_core.adapters.websocket import DynamoDueEnds
    from spool_core.due_ends import DueEndSweeper

    config = config or settings()
    return DueEndSweeper(
        DynamoDueEnds(aws.dynamodb(config), config.connections_table),
        lambda tenant_id: _job_tables(Tenant(tenant_id), config)[1],
    )


def usage_store(tenant: Tenant, config: Settings | None = None) -> DynamoUsageStore:
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.usage import DynamoUsageStore

    config = config or settings()
    return DynamoUsageStore(ScopedTable(aws.dynamodb(config), config.usage_table, TenantScope(tenant)))


def default_limits(config: Settings) -> TenantLimits:
    from spool_core.limits.model import TenantLimits
    from spool_core.units import nanos

    budget = config.default_daily_budget_usd
    return TenantLimits(
        tokens_per_minute=config.default_tokens_per_minute,
        tokens_per_day=config.default_tokens_per_day,
        max_concurrent_jobs=config.default_max_concurrent_jobs,
        daily_budget_nanos=nanos(budget) if budget is not None else None,
    )


def rate_limiter(tenant: Tenant, config: Settings | None = None) -> RateLimiter:
    """The tenant's limits: its own (usage table, read at every admission) or the deployment's."""
    from spool_core.limits.service import RateLimiter

    config = config or settings()
    return RateLimiter(usage_store(tenant, config), default_limits(config))


def feature_flags(config: Settings | None = None) -> Flags:
    from spool_core.flags import DEFAULT_FLAGS_FILE, flags

    config = config or settings()
    return flags(config.flags_appconfig, config.flags_file or str(DEFAULT_FLAGS_FILE))


def catalog(tenant: Tenant | None, config: Settings | None = None) -> ModelCatalog:
    """The models as a tenant may use them (feature flags decide rollouts)."""
    from spool_core.models import ModelCatalog, registry

    config = config or settings()
    return ModelCatalog(registry(), feature_flags(config), tenant.id if tenant else None)


def circuit_breaker(config: Settings | None = None, *, fresh_seconds: float = 0.0) -> CircuitBreaker:
    from spool_core.adapters.circuits import DynamoCircuitStore
    from spool_core.circuits import CircuitBreaker

    config = config or settings()
    return CircuitBreaker(
        DynamoCircuitStore(aws.dynamodb(config), config.system_table),
        threshold=config.circuit_threshold,
        window_seconds=config.circuit_window_seconds,
        cooldown_seconds=config.circuit_cooldown_seconds,
        fresh_seconds=fresh_seconds,
    )


# The worker's breaker lives as long as its container and trusts what it last read or wrote for this
# long: back-to-back jobs then skip the circuit read before their first token (spool_core.circuits).
WORKER_CIRCUIT_FRESH_SECONDS = 1.0


@lru_cache(maxsize=8)
def _worker_circuit_breaker(config: Settings) -> CircuitBreaker:
    return circuit_breaker(config, fresh_seconds=WORKER_CIRCUIT_FRESH_SECONDS)


def connections(config: Settings | None = None) -> DynamoConnectionStore:
    from spool_core.adapters.websocket import DynamoConnectionStore

    config = config or settings()
    return DynamoConnectionStore(aws.dynamodb(config), config.connections_table)


def fanout(tenant: Tenant, config: Settings | None = None) -> Fanout:
    """Subscriptions of one tenant's jobs, pushed through the WebSocket management API."""
    from spool_core.adapters.dynamodb import ScopedTable
    from spool_core.adapters.websocket import DynamoSubscriptionStore, ManagementApiPusher
    from spool_core.subscriptions import Fanout

    config = config or settings()
    jobs, chunks = _job_tables(tenant, config)
    subscriptions = DynamoSubscriptionStore(
        ScopedTable(aws.dynamodb(config), config.connections_table, TenantScope(tenant))
    )
    pusher = ManagementApiPusher(aws.websocket_management(config))
    return Fanout(jobs, chunks, subscriptions, pusher, ends=chunks)
