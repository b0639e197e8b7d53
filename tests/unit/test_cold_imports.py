"""Cold start, structurally: importing a function's handler loads none of the heavy libraries that only
some calls need (``openai``, the X-Ray SDK where tracing is off, tiktoken, Parameters and AppConfig),
and the authorizer loads only the key lookup. Each check imports the handler in a fresh interpreter
laid out as Lambda lays out the function (``bench/cold.py``); nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import cold
from spool_core import observability
from spool_core.observability import NoTracing
from spool_core.providers import ProviderError
from tests.support import ROOT

HANDLERS = {handler.name: handler for handler in cold.handlers()}
# Loaded by the first call that needs them, by no handler at import.
NEVER_AT_IMPORT = (
    "openai",
    "aws_xray_sdk.core",
    "tiktoken",
    "spool_core.providers.bedrock",
    "spool_core.providers.openai_compatible",
    "spool_core.providers.simulated",
    # Powertools' parser models: its batch utilities load them for type hints when pydantic is
    # already imported (spool_core/queue.py); the consumers import the batch utilities first.
    "aws_lambda_powertools.utilities.parser",
)
# Parameters (secrets, SSM) and AppConfig (feature flags): only where used. The SQS consumers
# evaluate feature flags on every job (the runner's model fallback), so they may load them at init.
CONFIG_SERVICES = (
    "aws_lambda_powertools.utilities.parameters",
    "aws_lambda_powertools.utilities.feature_flags",
)
EVERY_JOB_USES_FLAGS: set[str] = set()  # flags load with the first job that reads them
# What the authorizer needs is the key store, its cache and a DynamoDB client: no job, context,
# model registry, subscription or web machinery, and no tracer (it traces nothing, even deployed).
NOT_FOR_THE_AUTHORIZER = (
    *NEVER_AT_IMPORT,
    *CONFIG_SERVICES,
    "spool_core.jobs.model",
    "spool_core.contexts.model",
    "spool_core.models",
    "spool_core.subscriptions",
    "spool_core.events",
    "starlette",
)

# Functions that serve REST routes through Powertools' resolver; the others (the authorizer, the
# WebSocket handler, the streaming web app, the queue and stream consumers) never load it (~50 ms).
REST_FUNCTIONS = {
    "ChunksFunction",
    "ContextsFunction",
    "HealthFunction",
    "JobsFunction",
    "ModelsFunction",
    "UsageFunction",
}
REST_RESOLVER = "aws_lambda_powertools.event_handler.api_gateway"


def _python(code: str, env: dict[str, str], cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_every_python_function_of_the_template_is_checked() -> None:
    assert {"AuthorizerFunction", "JobsFunction", "StreamFunction", "WorkerFunction"} <= set(HANDLERS)
    assert HANDLERS["StreamFunction"].module == "app"  # the web app, as its server imports it
    assert HANDLERS["DeadLetterFunction"].module == "dead_letter"


def test_the_benchmarks_pydantic_floor_runs_as_every_function_does() -> None:
    """The floor leaves out what the functions' environment leaves out (pydantic's plugin scan)."""
    for handler in HANDLERS.values():
        assert cold.FLOOR_ENVIRONMENT.items() <= handler.spec.environment.items(), handler.name


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_a_handler_imports_no_heavy_library(name: str) -> None:
    forbidden = NEVER_AT_IMPORT if name in EVERY_JOB_USES_FLAGS else (*NEVER_AT_IMPORT, *CONFIG_SERVICES)
    assert cold.loaded(HANDLERS[name], forbidden) == []


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_only_the_rest_functions_load_the_rest_resolver(name: str) -> None:
    expected = [REST_RESOLVER] if name in REST_FUNCTIONS else []
    assert cold.loaded(HANDLERS[name], (REST_RESOLVER,)) == expected


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_importing_a_handler_runs_no_full_garbage_collection(name: str) -> None:
    """The layer freezes what was imported before it (spool_core/__init__.py), so the collector's
    first full pass, which walks every object loaded so far (25-30 ms), does not run at import."""
    handler = HANDLERS[name]
    probe = (
        f"import gc, json; import {handler.module}; "
        "print(json.dumps([gc.get_freeze_count() > 0, gc.get_stats()[2]['collections']]))"
    )
    frozen, full_collections = json.loads(_python(probe, cold.environment(handler), handler.code_dir))
    assert (frozen, full_collections) == (True, 0)


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_only_the_contexts_function_loads_the_context_store(name: str) -> None:
    """A job loads the context store only when it names a context (admission counts it, the worker
    reads it): the functions that create, run or stream jobs do not load it at import."""
    store = ("spool_core.contexts.model", "spool_core.contexts.service")
    expected = ["spool_core.contexts.model"] if name == "ContextsFunction" else []  # its request bodies
    assert cold.loaded(HANDLERS[name], store) == expected


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_the_key_lookup_loads_at_init_only_where_every_call_uses_it(name: str) -> None:
    """The authorizer uses it on every call and the fanout on every delivery (is the subscriber's
    key still valid?); the others never authenticate a key, or do it on some calls only (WebSocket
    $connect and subscribe, the deep health check): they load it on that call."""
    every_call = {"AuthorizerFunction", "FanoutFunction"}
    expected = ["spool_core.adapters.api_keys"] if name in every_call else []
    assert cold.loaded(HANDLERS[name], ("spool_core.adapters.api_keys",)) == expected


def test_the_authorizer_imports_only_the_key_lookup_even_with_tracing_on() -> None:
    authorizer = HANDLERS["AuthorizerFunction"]
    assert cold.loaded(authorizer, NOT_FOR_THE_AUTHORIZER, tracing=True) == []
    assert cold.loaded(authorizer, ("spool_core.auth", "spool_core.adapters.api_keys")) == [
        "spool_core.auth",
        "spool_core.adapters.api_keys",
    ]


def test_the_chunk_reader_loads_no_admission() -> None:
    """ChunksFunction serves pages of the log: it loads the log's reader, and none of what creating a
    job needs (the job service, contexts, limits, the model registry)."""
    chunks = HANDLERS["ChunksFunction"]
    admission = (
        "spool_core.jobs.service",
        "spool_core.contexts.service",
        "spool_core.limits.model",
        "spool_core.limits.service",
        "spool_core.models",
    )
    assert cold.loaded(chunks, admission) == []
    assert cold.loaded(chunks, ("spool_core.jobs.pages",)) == ["spool_core.jobs.pages"]


def test_the_dead_letter_consumer_never_loads_the_runner() -> None:
    """It ends jobs without running them: no runner, context service, circuits or providers."""
    machinery = (
        "spool_core.jobs.runner",
        "spool_core.contexts.service",
        "spool_core.circuits",
        "spool_core.providers",
    )
    assert cold.loaded(HANDLERS["DeadLetterFunction"], machinery) == []


def test_the_worker_loads_the_runner_at_init() -> None:
    """Every worker invocation runs a job: loading the runner later would only move its cost from
    the function's init to its first job, and out of what bench/cold.py measures."""
    assert cold.loaded(HANDLERS["WorkerFunction"], ("spool_core.jobs.runner",)) == ["spool_core.jobs.runner"]


def test_a_function_that_traces_gets_the_x_ray_tracer_when_deployed() -> None:
    jobs = HANDLERS["JobsFunction"]
    assert cold.loaded(jobs, ("aws_xray_sdk.core",), tracing=True) == ["aws_xray_sdk.core"]
    assert cold.loaded(jobs, ("aws_xray_sdk.core",), tracing=False) == []


def test_the_tracer_is_created_on_first_use_with_the_x_ray_provider_when_tracing_is_on() -> None:
    environment = cold.environment(HANDLERS["JobsFunction"], tracing=True)
    probe = (
        "import sys, json; from spool_core import observability as o; "
        "before = 'aws_xray_sdk.core' in sys.modules; t = o.tracer; "
        "print(json.dumps([before, t.disabled, type(t.provider).__module__, o.tracer is t]))"
    )
    before, disabled, provider, same = json.loads(_python(probe, environment))
    assert (before, disabled, same) == (False, False, True)
    assert provider.startswith("aws_xray_sdk")


def test_with_tracing_off_the_tracer_records_nothing_and_loads_no_x_ray_recorder() -> None:
    environment = cold.environment(HANDLERS["JobsFunction"], tracing=False)
    probe = (
        "import sys, json; from spool_core import observability as o; t = o.tracer; "
        "print(json.dumps([t.disabled, type(t.provider).__name__, 'aws_xray_sdk.core' in sys.modules]))"
    )
    assert json.loads(_python(probe, environment)) == [True, "NoTracing", False]


def test_the_tracer_passes_calls_through_when_tracing_is_off() -> None:
    tracer = observability.tracer  # conftest turns tracing off, as the local stack does
    assert isinstance(tracer.provider, NoTracing)

    @tracer.capture_method
    def add(a: int, b: int) -> int:
        return a + b

    @tracer.capture_lambda_handler
    def handler(event: dict[str, int], context: object) -> int:
        tracer.put_annotation("tenant", "acme")
        tracer.put_metadata("event", event)
        return add(event["a"], event["b"])

    assert handler({"a": 1, "b": 2}, None) == 3

    @tracer.capture_method
    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        broken()


def test_the_silent_provider_is_complete() -> None:
    provider = NoTracing()
    with provider.in_subsegment("## a") as segment:
        segment.put_annotation("k", "v")
        segment.put_metadata("k", {"v": 1})
        segment.add_subsegment(object())
        segment.remove_subsegment(object())
        segment.add_exception(ValueError("x"), [])
        segment.close()

    async def in_async() -> None:
        async with provider.in_subsegment_async("## b") as inner:
            inner.put_annotation("k", 1)

    asyncio.run(in_async())
    provider.put_annotation("k", "v")
    provider.put_metadata("k", "v")
    provider.patch(["boto3"])
    provider.patch_all()


def test_observability_names_only_what_it_has() -> None:
    with pytest.raises(AttributeError, match="no attribute 'tracker'"):
        _ = observability.tracker  # type: ignore[attr-defined]


def test_a_model_call_loads_its_provider_and_sdk_when_first_needed() -> None:
    tables = ("API_KEYS", "CONTEXTS", "JOBS", "CHUNKS", "USAGE", "SYSTEM", "CONNECTIONS")
    environment = {
        **cold.environment(HANDLERS["WorkerFunction"]),
        **{f"SPOOL_{table}_TABLE": table.lower() for table in tables},
        "SPOOL_BUCKET": "bucket",
        "SPOOL_JOBS_QUEUE_URL": "http://queue/jobs",
        "SPOOL_DEAD_LETTER_QUEUE_URL": "http://queue/dead",
        "SPOOL_OPENAI_API_KEY_PARAMETER": "env:TEST_OPENAI_KEY",
        "TEST_OPENAI_KEY": "sk-test",
    }
    probe = (
        "import sys, json\n"
        "from spool_core import bootstrap\n"
        "from spool_core.models import registry\n"
        "before = [m for m in ('openai', 'spool_core.providers.openai_compatible') if m in sys.modules]\n"
        "spec = registry().all()[0].model_copy(update={'provider': 'openai'})\n"
        "provider = bootstrap.provider_for(spec, bootstrap.settings())\n"
        "print(json.dumps([before, type(provider).__name__, 'openai' in sys.modules]))\n"
    )
    before, kind, after = json.loads(_python(probe, environment))
    assert (before, kind, after) == ([], "OpenAICompatibleProvider", True)


def test_openai_errors_are_still_classified() -> None:
    import httpx2 as httpx
    import openai

    from spool_core.providers.openai_compatible import classify

    request = httpx.Request("POST", "http://upstream/v1/chat/completions")

    def status(code: int) -> openai.APIStatusError:
        response = httpx.Response(code, request=request)
        error_type = {429: openai.RateLimitError, 404: openai.NotFoundError}.get(code, openai.APIStatusError)
        return error_type("upstream said no", response=response, body=None)

    cases = {
        429: ("provider_throttled", True),
        404: ("provider_model_unavailable", False),
        503: ("provider_unavailable", True),
        400: ("provider_error", False),
    }
    for code, expected in cases.items():
        error = classify(status(code))
        assert isinstance(error, ProviderError)
        assert (error.code, error.retryable) == expected
    broken = classify(openai.APIConnectionError(request=request))
    assert (broken.code, broken.retryable) == ("provider_unavailable", True)


# Runs the SnapStart before-snapshot hooks the handler's import registered, as Lambda (and a local
# function fork server) does before a snapshot; ``snapshot_restore_py`` is imported as ``hooks``.
RUN_HOOKS = "[hook(*args, **kwargs) for hook, args, kwargs in hooks._before_snapshot_registry]"


def configured(handler: cold.Handler, **variables: str) -> dict[str, str]:
    """``handler``'s environment with the settings the template resolves at deploy time (tables,
    bucket, queues), pointing at nothing, and ``variables``."""
    tables = ("API_KEYS", "CONTEXTS", "JOBS", "CHUNKS", "USAGE", "SYSTEM", "CONNECTIONS")
    return {
        **cold.environment(handler),
        **{f"SPOOL_{table}_TABLE": table.lower() for table in tables},
        "SPOOL_BUCKET": "bucket",
        "SPOOL_JOBS_QUEUE_URL": "http://127.0.0.1:9/queue/jobs",
        "SPOOL_DEAD_LETTER_QUEUE_URL": "http://127.0.0.1:9/queue/dead",
        "AWS_DEFAULT_REGION": "us-east-1",
        **variables,
    }


def test_the_snapshot_hooks_do_a_first_calls_loading_without_a_request() -> None:
    """Before a snapshot (SnapStart; the local fork servers) the jobs function creates its AWS clients,
    builds its routes' validation models and loads what creating a job imports, with no endpoint to
    call (the hooks make no request: a snapshot must hold no connection)."""
    jobs = HANDLERS["JobsFunction"]
    probe = (
        f"import sys, json, snapshot_restore_py as hooks; import {jobs.module}; "
        "from spool_core.adapters import aws; "
        "before = 'spool_core.adapters.jobs' in sys.modules; "
        f"{RUN_HOOKS}; "
        "after = 'spool_core.adapters.jobs' in sys.modules; "
        "print(json.dumps([before, after, aws._client.cache_info().currsize]))"
    )
    environment = configured(jobs, SPOOL_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens there
    assert json.loads(cold._run(jobs.code_dir, probe, environment)) == [False, True, 3]


# A new container's first call, as each function makes it: the services it wires (no request is made
# building them). After the snapshot hooks, none of this may import a module or create a client:
# containers are forked from the snapshot, and each used to repeat 70-110 ms of CPU on its first call.
# The web apps' first request also starts Starlette's thread pool, which imports anyio's backend.
THREAD_POOL = "from anyio._core._eventloop import get_async_backend; get_async_backend('asyncio')"
FIRST_CALLS = {
    "JobsFunction": "bootstrap.job_service(tenant); bootstrap.secrets(config)",
    "EventsFunction": f"{THREAD_POOL}; bootstrap.chunk_pages(tenant)",
    "StreamFunction": f"{THREAD_POOL}; bootstrap.job_service(tenant)",
    "WebSocketFunction": (
        "bootstrap.job_service(tenant); bootstrap.connection_guard(config); aws.websocket_management(config)"
    ),
    "FanoutFunction": "bootstrap.fanout(tenant, config); bootstrap.connection_guard(config)",
    "WorkerFunction": (
        "from openai import Stream; from spool_core.providers.openai_compatible import StreamedChunk; "
        "bootstrap.job_runner(tenant, config); bootstrap._openai_client('http://127.0.0.1:9/v1', 'sk-x'); "
        "Stream[object]; StreamedChunk.model_validate({'id': 'c', 'object': 'chat.completion.chunk', "
        "'created': 1, 'model': 'm', 'choices': [{'index': 0, 'delta': {'content': 'hi'}}]})"
    ),
}


@pytest.mark.parametrize("name", sorted(FIRST_CALLS))
def test_after_the_snapshot_hooks_a_first_call_loads_nothing(name: str) -> None:
    handler = HANDLERS[name]
    first_call = FIRST_CALLS[name]
    probe = (
        f"import sys, json, snapshot_restore_py as hooks; import {handler.module}; "
        "from spool_core import bootstrap; from spool_core.adapters import aws; "
        "from spool_core.tenancy import Tenant; "
        f"{RUN_HOOKS}; "
        "config = bootstrap.settings(); tenant = Tenant('t1'); "
        "modules, clients = set(sys.modules), aws._client.cache_info().misses; "
        "tls = bootstrap.provider_tls.cache_info().misses; "
        f"{first_call}; "
        "print(json.dumps([sorted(set(sys.modules) - modules), aws._client.cache_info().misses - clients, "
        "bootstrap.provider_tls.cache_info().misses - tls]))"
    )
    environment = configured(
        handler,
        SPOOL_EVENTS_SECRET_ARN="arn:aws:secretsmanager:us-east-1:123456789012:secret:events",
        SPOOL_WEBSOCKET_MANAGEMENT_URL="http://127.0.0.1:9/local",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",  # nothing listens there
    )
    loaded, clients, tls_contexts = json.loads(cold._run(handler.code_dir, probe, environment))
    ours = [m for m in loaded if m.startswith(("spool_core", "openai", "aws_lambda_powertools", "anyio"))]
    assert ours == [], ", ".join(ours)
    assert (clients, tls_contexts) == (0, 0)


class _Body:
    def stream(self, **_: object) -> Iterator[bytes]:
        yield b"{}"


@pytest.mark.parametrize("load_models", [True, False])
def test_after_the_snapshot_hooks_a_first_request_builds_no_shapes(
    load_models: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore builds an operation's request and response shapes on its first call; the hooks build
    them all before the snapshot, so a new container's first `PutItem` (answered here without a
    network, from botocore's own `before-send` event) resolves none. Without them it resolves many."""
    import boto3
    from botocore.awsrequest import AWSResponse
    from botocore.model import ShapeResolver

    from spool_core.snapshot import load_operation_models

    client = boto3.Session().client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    client.meta.events.register(
        "before-send.dynamodb.*", lambda request, **_: AWSResponse(request.url, 200, {}, _Body())
    )
    if load_models:
        load_operation_models(client)
    resolved: list[str] = []
    original = ShapeResolver.get_shape_by_name

    def counting(self: ShapeResolver, name: str, member_traits: object = None) -> object:
        resolved.append(name)
        return original(self, name, member_traits)

    monkeypatch.setattr(ShapeResolver, "get_shape_by_name", counting)
    client.put_item(TableName="t", Item={"pk": {"S": "a"}, "n": {"M": {"l": {"N": "1"}}}})
    client.transact_write_items(
        TransactItems=[
            {
                "Update": {
                    "TableName": "t",
                    "Key": {"pk": {"S": "a"}},
                    "UpdateExpression": "SET #a = :a",
                    "ExpressionAttributeNames": {"#a": "a"},
                    "ExpressionAttributeValues": {":a": {"S": "b"}},
                }
            }
        ]
    )
    assert (resolved == []) == load_models, resolved
