"""What an initialized function does before it is snapshotted: the work the first call of every new
execution environment would otherwise repeat, done once.

The hooks are Lambda SnapStart's runtime hooks (AWS's ``snapshot-restore-py``): with SnapStart on,
Lambda runs them after the init phase and snapshots the result. The local stack's function fork
servers run them the same way before forking a function's containers (``spool/devstack/runtime.py``),
so a burst that scales a function's pool up does not repeat them per container. Importing a handler
never runs them: the cold-start import stays what it was (``tests/unit/test_cold_imports.py``), and on
Lambda without SnapStart they are never called, so the first call does the work as before.
"""

from __future__ import annotations

import importlib
from typing import Any

from snapshot_restore_py import register_before_snapshot

__all__ = [
    "JOB_CREATION_MODULES",
    "create_aws_clients",
    "create_openai_client",
    "load_before_snapshot",
    "load_operation_models",
    "register_before_snapshot",
]


def create_aws_clients() -> None:
    """The DynamoDB, SQS and S3 clients (~0.2 s of CPU on a first call), Secrets Manager's (through
    Parameters' provider) where the deployment signs with a secret, and the WebSocket API's management
    client where the function pushes to connections. No request is made: a client opens its
    connections on its first request, so none is in the snapshot, and no secret is read into it."""
    from spool_core import bootstrap
    from spool_core.adapters import aws

    config = bootstrap.settings()
    for client in (aws.dynamodb, aws.sqs, aws.s3):
        load_operation_models(client(config))
    if config.events_secret_arn:
        bootstrap.secrets(config)
    if config.websocket_management_url:
        aws.websocket_management(config)


register_before_snapshot(create_aws_clients)


def load_operation_models(client: Any, depth: int = 2) -> None:
    """Build every operation's request and response shapes of ``client``'s service model, which botocore
    builds lazily on each operation's first call (each new container's first ``PutItem``,
    ``TransactWriteItems``, ``Query``... resolved hundreds of shapes: ~10 ms of CPU in a worker's first
    job), and its error classes (built on a first error, a failed condition say). Each client has a
    model of its own: this serves the clients ``spool_core.adapters.aws`` keeps and hands every call.
    A recursive shape (DynamoDB's ``AttributeValue``: a map or a list of them) is a new object at each
    level, each built on first use: ``depth`` levels of it are built (an item's attributes, and the
    values of a map or list among them). All of DynamoDB's, SQS's and S3's: ~80 ms of CPU, once per
    snapshot."""
    client.exceptions  # noqa: B018 - a property that builds the error classes
    model = client.meta.service_model
    for name in model.operation_names:
        operation = model.operation_model(name)
        pending: list[tuple[Any, tuple[str, ...]]] = [
            (operation.input_shape, ()),
            (operation.output_shape, ()),
        ]
        while pending:
            shape, path = pending.pop()
            if shape is None or path.count(shape.name) >= depth:
                continue
            inner = (*path, shape.name)
            children = [*getattr(shape, "members", {}).values()]  # a structure's
            children += [getattr(shape, attribute, None) for attribute in ("member", "key", "value")]
            pending.extend((child, inner) for child in children)


# What creating a job loads on its first call (the stores, the queue's, flags, token counting), in
# every function that creates one (the jobs function, the OpenAI-compatible surface).
JOB_CREATION_MODULES = (
    "spool_core.adapters.jobs",
    "spool_core.adapters.contexts",
    "spool_core.adapters.usage",
    "spool_core.flags",
    "aws_lambda_powertools.utilities.feature_flags",
    "tiktoken",
)


def load_before_snapshot(*modules: str) -> None:
    """Register the import of ``modules`` a function's first call would load (importing them at the
    handler's import would count against its cold start; before a snapshot it costs no one)."""
    register_before_snapshot(_import, modules)


def _import(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


def create_openai_client() -> None:
    """The TLS context the OpenAI-compatible providers' clients share (it loads the CA bundle, ~30 ms
    of CPU), and an ``openai`` client made and dropped, as a worker's first job on such a model would
    make one; the provider's module is loaded, and the model each streamed event is read into is used
    once. The providers' own clients are not made here: a real provider's key is a secret, read over
    the network."""
    from spool_core import bootstrap
    from spool_core.providers.openai_compatible import StreamedChunk

    # The providers' client as bootstrap makes it (its TLS context included), not kept in its cache.
    bootstrap._openai_client.__wrapped__("http://127.0.0.1:9/v1", "snapshot").close()
    StreamedChunk.model_validate({"choices": [{"delta": {"content": "hi"}}], "usage": None})
