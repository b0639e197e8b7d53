"""Composition root: the one module that wires the AWS adapters to the logic.

Handlers ask it for a ready service at invocation. Clients are created on first use and reused by
warm invocations; nothing touches the network at import time. Tests build the same services from
in-memory fakes instead.
"""

from __future__ import annotations

from functools import lru_cache, partial

from spool_core.adapters import aws, probes
from spool_core.adapters.api_keys import DynamoApiKeyStore
from spool_core.auth import ApiKeys
from spool_core.health import HealthService, Probe
from spool_core.settings import Settings


def settings() -> Settings:
    return Settings.from_env()


@lru_cache(maxsize=8)
def _api_keys(config: Settings) -> ApiKeys:
    return ApiKeys(DynamoApiKeyStore(aws.dynamodb(config), config.api_keys_table))


def api_keys(config: Settings | None = None) -> ApiKeys:
    return _api_keys(config or settings())


@lru_cache(maxsize=8)
def _health(config: Settings) -> HealthService:
    tables = (config.api_keys_table, config.contexts_table, config.jobs_table, config.chunks_table)
    return HealthService(
        [
            Probe("dynamodb", partial(probes.dynamodb_tables, aws.dynamodb(config, probe=True), tables)),
            Probe("s3", partial(probes.s3_bucket, aws.s3(config, probe=True), config.bucket)),
            Probe(
                "queue",
                partial(
                    probes.sqs_queues,
                    aws.sqs(config, probe=True),
                    config.jobs_queue_url,
                    config.dead_letter_queue_url,
                ),
            ),
        ]
    )


def health_service(config: Settings | None = None) -> HealthService:
    return _health(config or settings())
