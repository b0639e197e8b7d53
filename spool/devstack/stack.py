"""The embedded stack as one object: start it, use ``base_url``, stop it.

Start order: bind every port (a busy one fails at once), start moto, provision the template's
resources, restore the local state, start each function's first container, then serve. Stop runs
the other way, and saves the local state once nothing runs any more.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import logging
import os
import py_compile
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from spool.devstack.gateway import WARM_UP_AGENT, GatewayHttpServer, RestApiEmulator
from spool.devstack.ports import PortInUse, listen
from spool.devstack.provision import ACCOUNT_ID, MotoServer, StackDescription, aws_client, provision
from spool.devstack.runtime import FORK_SERVER, InvocationError, LocalFunction
from spool.devstack.state import LocalState, StateLock, lock_state_dir
from spool.devstack.streams import JobTransitions, StreamChanges, StreamPoller
from spool.devstack.template import FunctionSpec, ScheduleEvent, Template, samconfig_parameters
from spool.devstack.websocket import ManagementApiServer, WebSocketGateway
from spool.devstack.worker_loop import SqsEventSource
from spool_core.bootstrap import default_limits
from spool_core.clock import rfc3339, utc_now
from spool_core.settings import Settings

log = logging.getLogger("devstack.stack")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEV_KEYS = "sk-local-dev:local"
API_LOGICAL_ID = "SpoolApi"
# Variables from the caller's environment that reach the handlers (Spool's knobs, Powertools' own).
PASSTHROUGH_PREFIXES = ("SPOOL_", "POWERTOOLS_")
ENV_REFERENCE = "env:"  # a secret read from the handlers' environment (spool_core.bootstrap.secret)
REAP_INTERVAL_SECONDS = 10.0
WARM_UP_JOB_ID = "job_" + "warmup" * 4 + "st"  # a job id no job has (ids are random base32)
WARM_UP_TENANT = "spool-warm-up"  # the warm-up job's tenant: no key reads it once it has run
STREAM_CONCURRENCY = 64  # open event streams at once, locally (Lambda's default account limit is 1,000)
# Queue workers per CPU when the caller does not say: a worker mostly waits on its provider (a job at
# 50 tok/s uses ~0.02 cores), so a core serves many; with 4 per CPU, 20 streams at 50 tok/s waited
# in the queue (time to first token 12-23 s); the template's MaximumConcurrency or reserved
# concurrency caps it (see docs/decisions.md for the figures).
WORKERS_PER_CPU = 16
MIN_WORKERS = 2
LIMITS_FUNCTION = "JobsFunction"  # admission's function: its environment holds the default limits


def starts_at_once(spec: FunctionSpec) -> bool:
    """Whether a function starts a new container as soon as none is free, instead of the runtime's short
    wait for a warm one. Those whose invocation holds its container for a whole job or stream (the
    worker, a queue consumer, runs its job to the end; a streaming web function serves one open
    stream): none comes free within the wait, so it was lost (a 20-job burst over SSE waited 0.1-0.3 s
    per job and per stream: persist-to-client p95 580-680 ms against 210-330 without). And the fanout,
    a stream-batch consumer whose records wait behind every invocation of their lane: its new
    containers start warm from the snapshot (38 ms of CPU on a first call), so starting one costs less
    than waiting (20 WebSocket streams, five alternating runs: p95 261-493 ms against 313-785 with the
    wait). Request/response functions keep the wait: a burst of requests is served well by a few
    warm containers (docs/decisions.md)."""
    return bool(spec.sqs_events or spec.web_app or spec.stream_events)


def code_directories(template: Template) -> list[Path]:
    """Where the template's functions run Python from: each layer's content and each function's code,
    and this runtime's own package (its fork server imports it)."""
    layers = template.resources_of_type("AWS::Serverless::LayerVersion").values()
    found = {
        template.root / str(uri) for layer in layers if (uri := layer.get("Properties", {}).get("ContentUri"))
    }
    found |= {template.root / spec.code_uri for spec in template.functions().values()}
    found.add(Path(__file__).resolve().parents[1])
    return sorted(found)


def compile_code(directories: Iterable[Path]) -> None:
    """Write the bytecode of the code the functions run (``code_directories``) where it is missing or
    out of date, as the layer ``sam build`` makes carries its own (shared/Makefile). Python writes it
    on import unless ``PYTHONDONTWRITEBYTECODE`` is set, as it is in many containers and CI images:
    then every function fork server compiled Spool's modules from source, and so did every container,
    for each module its first request loads (~22 ms of CPU for the job stores alone, per SSE stream in
    a burst). Up to date, this takes a few milliseconds. Bytecode checked by the source's time, as
    Python writes it itself (``SOURCE_DATE_EPOCH`` would make compileall write hashed bytecode, which
    it then never counts as up to date); a directory that cannot be written is left as it is (each
    process compiles its modules then, as before)."""
    for directory in directories:
        if os.access(directory, os.W_OK):
            compileall.compile_dir(
                directory, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
            )


def sized_workers(spec: FunctionSpec, cpus: int | None = None) -> int:
    """Containers for a queue-fed function on this machine: ``WORKERS_PER_CPU`` per CPU, at least
    ``MIN_WORKERS``, at most what the template lets AWS run at once (the event source's
    MaximumConcurrency, the function's reserved concurrency)."""
    wanted = max(MIN_WORKERS, WORKERS_PER_CPU * (cpus or os.cpu_count() or 1))
    caps = [event.maximum_concurrency for event in spec.sqs_events if event.maximum_concurrency]
    if spec.reserved_concurrency:
        caps.append(spec.reserved_concurrency)
    return min([wanted, *caps])


def parse_dev_keys(text: str) -> dict[str, str]:
    """``key1:tenantA,key2:tenantB`` -> {key: tenant}."""
    keys = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, tenant = pair.partition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"SPOOL_DEV_KEYS entry {pair!r} must look like key:tenant")
        keys[key] = tenant
    return keys


def tiktoken_cache_dir(environ: Mapping[str, str]) -> str:
    """Where the functions read tiktoken's encodings (offline: see docs/decisions.md)."""
    return environ.get("TIKTOKEN_CACHE_DIR", str(PROJECT_ROOT / ".cache" / "tiktoken"))


def local_overrides(environ: Mapping[str, str], template: Template) -> dict[str, str]:
    """Local values for the handlers' environment: the encodings on this machine, tracing and metrics
    off, and the caller's SPOOL_*/POWERTOOLS_* knobs. Variables the template computes from its
    resources or parameters (table names, queue URLs, ...) always come from the stack; to change a
    parameter, use --parameter-overrides as with sam deploy."""
    computed = {
        name
        for spec in template.functions().values()
        for name, value in spec.environment.items()
        if _references_resource(value, template.resources)
    }
    overrides = {
        "TIKTOKEN_CACHE_DIR": tiktoken_cache_dir(environ),
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    overrides.update(
        {k: v for k, v in environ.items() if k.startswith(PASSTHROUGH_PREFIXES) and k not in computed}
    )
    # A key given as ``env:VARIABLE`` (SPOOL_OPENAI_API_KEY_PARAMETER, a model's api_key_parameter)
    # is read from the handlers' environment: the variable it names reaches them too.
    overrides.update({k: environ[k] for k in referenced_variables(overrides) if k in environ})
    return overrides


def referenced_variables(overrides: Mapping[str, str]) -> set[str]:
    """The variables named by ``env:`` references in the passed-through values and in the models
    file they name (``SPOOL_MODELS_FILE``); a file that cannot be read is the registry's to report."""
    values: list[Any] = list(overrides.values())
    models_file = overrides.get("SPOOL_MODELS_FILE")
    if models_file:
        with contextlib.suppress(OSError, ValueError):
            values.append(json.loads(Path(models_file).read_text()))
    names: set[str] = set()
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values.extend(value.values())
        elif isinstance(value, list):
            values.extend(value)
        elif isinstance(value, str) and value.startswith(ENV_REFERENCE):
            names.add(value.removeprefix(ENV_REFERENCE))
    return names


def _references_resource(value: Any, resources: Mapping[str, Any]) -> bool:
    """Whether a template value is computed from a resource (a table name, a queue URL, ...)."""
    if isinstance(value, dict):
        if "Ref" in value:
            return str(value["Ref"]) in resources
        if "Fn::GetAtt" in value:
            return True
        if "Fn::Sub" in value:
            text = value["Fn::Sub"] if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"][0]
            return any(f"${{{name}" in text for name in resources)
        return any(_references_resource(v, resources) for v in value.values())
    if isinstance(value, list):
        return any(_references_resource(v, resources) for v in value)
    return False


class EmbeddedStack:
    def __init__(
        self,
        *,
        template_path: Path = PROJECT_ROOT / "template.yaml",
        host: str = "127.0.0.1",
        port: int = 8000,
        ws_port: int | None = None,
        config_env: str = "local",
        parameter_overrides: Mapping[str, str] | None = None,
        dev_keys: str | None = None,
        workers: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.template = Template.load(template_path)
        self.host = host
        self.port = port
        self._ws_port = ws_port
        self.dev_keys = parse_dev_keys(dev_keys or os.environ.get("SPOOL_DEV_KEYS") or DEFAULT_DEV_KEYS)
        stack_name, overrides = samconfig_parameters(self.template.root / "samconfig.toml", config_env)
        self.stack_name = stack_name or "spool-local"
        self.overrides = {**overrides, **(parameter_overrides or {})}
        self.template.overrides = self.overrides
        # Queue workers: as asked, else sized to this machine (``sized_workers``), per function.
        self._requested_workers = workers
        queue_fed = [spec for spec in self.template.functions().values() if spec.sqs_events]
        self.workers = workers or max((sized_workers(spec) for spec in queue_fed), default=MIN_WORKERS)
        self.state_dir = state_dir
        self.moto = MotoServer(host)
        self.description: StackDescription | None = None
        self.functions: dict[str, LocalFunction] = {}
        self._api_socket: socket.socket | None = None
        self._ws_socket: socket.socket | None = None
        self._server: GatewayHttpServer | None = None
        self._websocket: WebSocketGateway | None = None
        self._management: ManagementApiServer | None = None
        self._pollers: list[StreamPoller] = []
        self._sources: list[SqsEventSource] = []
        self._threads: list[threading.Thread] = []
        self._served: list[Callable[[], None]] = []  # how to stop each server that was started
        self._stopping = threading.Event()
        self.restored: dict[str, int] | None = None
        self.saved: dict[str, int] | None = None
        self._state_lock: StateLock | None = None
        self._state_loaded = False  # the state directory's snapshot is in moto, whole

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        return next(iter(self.dev_keys))

    @property
    def websocket_url(self) -> str:
        return self._websocket.url if self._websocket else ""

    # ------------------------------------------------------------------ start
    def start(self) -> EmbeddedStack:
        try:
            if self.state_dir is not None:  # before anything runs: another stack's, or not writable
                self._state_lock = lock_state_dir(self.state_dir)
            self._bind()
            # The fork server loads tiktoken's encodings from where the functions read them.
            environment = {"TIKTOKEN_CACHE_DIR": tiktoken_cache_dir(os.environ)}
            compile_code(code_directories(self.template))  # before any handler is imported
            preload = threading.Thread(
                target=FORK_SERVER.start, args=(environment,), name="fork-server", daemon=True
            )
            preload.start()  # its imports overlap with moto's start and the provisioning
            self.moto.start()
            self._start()
        except BaseException:
            # Stopped (Ctrl-C) or failed after the state was restored: what ran since is saved, as at
            # any stop (a restored backlog can keep the start busy for minutes). Not before: a half
            # restored state would replace the whole one.
            self.stop(save=self._state_loaded)
            raise
        return self

    def _bind(self) -> None:
        """Every listening port first: a busy one ends the start before anything runs."""
        self._api_socket = listen(self.host, self.port, "SPOOL_PORT")
        self.port = self._api_socket.getsockname()[1]
        if self._ws_port is not None:
            self._ws_socket = listen(self.host, self._ws_port, "SPOOL_WS_PORT")
        else:  # next to the API port if it is free, any free port otherwise
            try:
                self._ws_socket = listen(self.host, self.port + 1)
            except (PortInUse, OverflowError):
                self._ws_socket = listen(self.host, 0)

    def _start(self) -> None:
        assert self._api_socket is not None and self._ws_socket is not None
        description = provision(
            self.template, self.moto.url, stack_name=self.stack_name, overrides=self.overrides
        )
        stage = description.parameters.get("StageName", "prod")
        self._websocket = WebSocketGateway(
            {}, self._ws_socket, stage=stage, throttles=self.template.websocket_throttles()
        )
        self._management = ManagementApiServer(self._websocket, self.host)
        management_url = f"http://{self.host}:{self._management.server_address[1]}/{stage}"
        description.overrides = {
            **local_overrides(os.environ, self.template),
            "SPOOL_WEBSOCKET_URL": self._websocket.url,
            "SPOOL_WEBSOCKET_MANAGEMENT_URL": management_url,
        }
        self.description = description
        os.environ.update(description.environment(self.template))
        if self.state_dir is not None:
            state = LocalState(self.state_dir, self.template, description)
            self.restored = state.restore()
            self._state_loaded = True
            previous = self._state_lock.previous if self._state_lock is not None else None
            lost = previous.lost_since(state.saved_at) if previous is not None else None
            if lost:
                log.warning("%s", lost)
            if self.restored:
                log.info(
                    "restored local state from %s: %d items, %d objects, %d messages",
                    self.state_dir,
                    *self.restored.values(),
                )
        self._seed_keys()
        self._create_functions(description)
        self._warm()

        emulator = RestApiEmulator(
            self.template,
            API_LOGICAL_ID,
            self.functions,
            region=description.region,
            stage=stage,
            resolve=description.resolver().resolve,
            cors_origins=os.environ.get("SPOOL_CORS_ORIGINS", "*"),
        )
        emulator.playground_key = self.api_key
        emulator.local_info = {
            "stack_name": self.stack_name,
            "endpoint_url": description.endpoint_url,
            "region": description.region,
            "resources": {
                name: description.refs[name]
                for name in self.template.resources_of_type("AWS::DynamoDB::Table", "AWS::SQS::Queue")
            },
            # what `spool limits` moves a tenant from and back to
            "limit_defaults": default_limits(
                Settings.from_env(description.environment_for(self.template, LIMITS_FUNCTION))
            )._asdict(),
        }
        self._server = GatewayHttpServer(self._api_socket, emulator)
        self._serve("api-gateway", self._server.serve_forever, self._server.shutdown)
        self._websocket._routes = {
            route: self.functions[name] for route, name in self.template.websocket_routes().items()
        }
        self._websocket.start()
        self._served.append(self._websocket.stop)
        self._serve("ws-management", self._management.serve_forever, self._management.shutdown)
        self._start_pollers(description)
        self._start_sources(description)
        self._start_schedules()
        self._spawn("reaper", self._reap)
        self._warm_job_path()

    def _create_functions(self, description: StackDescription) -> None:
        resolver = description.resolver()
        for name, spec in self.template.functions().items():
            # Workers: as many as asked, else sized to the machine. A streaming function holds a
            # container per open stream (as each invocation holds a sandbox on Lambda), so it may have many.
            concurrency = (
                (self._requested_workers or sized_workers(spec))
                if spec.sqs_events
                else STREAM_CONCURRENCY
                if spec.web_app
                else None
            )
            self.functions[name] = LocalFunction(
                spec,
                self.template.root,
                region=description.region,
                name=resolver.ref(name),
                environment=description.environment_for(self.template, name),
                max_concurrency=concurrency,
                scale_up_delay=0.0 if starts_at_once(spec) else None,
            )

    def function_variant(self, name: str, environment: Mapping[str, str]) -> LocalFunction:
        """The function ``name`` configured with some variables changed (its own containers), e.g. to
        measure one invocation with tracemalloc; the caller shuts it down."""
        assert self.description is not None
        base = self.functions[name]
        return LocalFunction(
            base.spec,
            self.template.root,
            region=self.description.region,
            name=base.name,
            environment={**self.description.environment_for(self.template, name), **environment},
        )

    def _warm(self) -> None:
        """One container per function before `ready`, so the first requests are not cold starts."""
        threads = [
            threading.Thread(target=function.warm, name=f"warm-{name}", daemon=True)
            for name, function in self.functions.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _warm_job_path(self) -> None:
        """One real job along a job's path before `ready` (as a Lambda warmer does), so the first job
        of the developer is not the one that loads what each function loads on its first call: a
        short job on a simulated model for a tenant of its own, created, run, read to its end over
        SSE and read back (authorizer, jobs function, worker, events function), with a key created
        for it and deleted once it ended; and a chunk stream record (the fanout, which a job nobody
        subscribed to does not invoke). The job stays in that tenant's history, which no key reads.
        Failures are ignored: it is only a warm-up."""
        tenant = self.dev_keys[self.api_key]
        chunk = {"pk": {"S": f"{tenant}#job#{WARM_UP_JOB_ID}"}, "sequence_id": {"N": "1"}}
        # Behind a restored backlog, the warm-up job would wait for all of it (and `ready` with it);
        # the backlog's own jobs warm the path.
        work: list[Callable[[], None]] = [] if self._backlog() else [self._warm_up_job]
        for name, spec in self.template.functions().items():
            for stream_event in spec.stream_events:
                if stream_event.table == "ChunksTable":
                    image = {**chunk, "text": {"S": ""}, "created_at": {"S": rfc3339(utc_now())}}
                    change = {
                        "eventID": "warm-up",
                        "eventName": "INSERT",
                        "eventSource": "aws:dynamodb",
                        "dynamodb": {"Keys": chunk, "NewImage": image},
                    }
                    work.append(partial(self._invoke_quietly, name, {"Records": [change]}))
        started = time.monotonic()
        threads = [threading.Thread(target=task, name="warm-up", daemon=True) for task in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        log.info("warmed up the job path with a job of its own in %.1f s", time.monotonic() - started)
        # A web function's invocation ends after its client has the answer (the gateway closes it):
        # wait for it, or the first real request would find that container busy and start another.
        for function in self.functions.values():
            if function.spec.web_app:
                function.wait_idle(timeout=30)

    def _backlog(self) -> bool:
        """Whether a queue a function reads holds restored messages (a queue nothing reads, such as
        the stream failures', does not count: nothing would wait behind it)."""
        if not (self.restored and self.restored["messages"]) or self.description is None:
            return False
        sqs = aws_client("sqs", self.description.endpoint_url, self.description.region)
        read = {event.queue for spec in self.template.functions().values() for event in spec.sqs_events}
        for queue in read:
            attributes = sqs.get_queue_attributes(
                QueueUrl=self.description.refs[queue], AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]
            if int(attributes.get("ApproximateNumberOfMessages", 0)):
                return True
        return False

    def _invoke_quietly(self, name: str, event: dict[str, Any]) -> None:
        with contextlib.suppress(InvocationError):
            self.functions[name].invoke(event)

    def _warm_up_job(self) -> None:
        from spool_core import bootstrap
        from spool_core.auth import hash_api_key
        from spool_core.models import registry
        from spool_core.tenancy import Tenant

        simulated = [m.id for m in registry().all() if m.provider == "simulated" and m.enabled]
        if not simulated:
            return  # a registry of real models only: a warm-up must not pay a provider
        key = f"sk-warm-up-{uuid.uuid4().hex}"
        keys = bootstrap.api_keys()
        keys.register(key, Tenant(WARM_UP_TENANT), description="local stack warm-up")
        try:
            headers = {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "User-Agent": WARM_UP_AGENT,
            }
            body = {"message": "warm-up", "model": simulated[0], "max_tokens": 4}
            job = self._warm_up_call("POST", "/v1/jobs", {**headers, "Idempotency-Key": key}, body)
            if job:
                self._warm_up_call("GET", f"/v1/jobs/{job['job_id']}/events", headers)  # to its end
                self._warm_up_call("GET", f"/v1/jobs/{job['job_id']}?output=false", headers)
        finally:
            assert self.description is not None
            dynamodb = aws_client("dynamodb", self.description.endpoint_url, self.description.region)
            table = bootstrap.settings().api_keys_table
            with contextlib.suppress(Exception):  # the stack is stopping: its tables go with it
                dynamodb.delete_item(TableName=table, Key={"key_hash": {"S": hash_api_key(key)}})

    def _warm_up_call(
        self, method: str, path: str, headers: Mapping[str, str], body: Any = None
    ) -> dict[str, Any] | None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data, dict(headers), method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
                raw = response.read()
        except OSError as exc:
            log.debug("warm-up %s %s: %s", method, path, exc)
            return None
        if not response.headers.get("Content-Type", "").startswith("application/json"):
            return None
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def _serve(self, name: str, serve: Callable[[], None], shutdown: Callable[[], None]) -> None:
        self._spawn(name, serve)
        self._served.append(shutdown)  # only servers whose loop runs: shutdown() would wait forever

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_pollers(self, description: StackDescription) -> None:
        """The DynamoDB Streams event sources (the fanout), and a reader of the jobs stream for the job
        log (one line per job transition)."""
        streams = aws_client("dynamodbstreams", description.endpoint_url, description.region)
        sources: list[tuple[str, LocalFunction | None, Any]] = [
            (event.table, self.functions[name], event)
            for name, spec in self.template.functions().items()
            for event in spec.stream_events
        ]
        jobs_stream = "JobsTable.StreamArn"
        if jobs_stream in description.attributes:
            sources.append(("JobsTable", None, None))
        for table, function, event in sources:
            poller = StreamPoller(
                streams,
                description.attributes[f"{table}.StreamArn"],
                function,
                batch_size=event.batch_size if event else 100,
                parallelization=event.parallelization if event else 1,
                max_retry_attempts=event.maximum_retry_attempts if event else None,
                region=description.region,
                filters=event.filters if event else (),
                observers=[JobTransitions(quiet_tenants=frozenset({WARM_UP_TENANT}))]
                if function is None
                else [],
                # Woken by a write to its own table only (a job's writes do not wake the chunk poller).
                changes=StreamChanges(description.endpoint_url, table=description.refs[table]),
            )
            self._pollers.append(poller)
            self._spawn(f"stream-{table}", poller.run)

    def _start_sources(self, description: StackDescription) -> None:
        """The SQS event sources: one poller per queue, as many invocations at once as the function
        may run containers."""
        resolver = description.resolver()
        sqs = aws_client("sqs", description.endpoint_url, description.region)
        for name, spec in self.template.functions().items():
            function = self.functions[name]
            for event in spec.sqs_events:
                source = SqsEventSource(
                    sqs,
                    resolver.ref(event.queue),
                    resolver.get_att(event.queue, "Arn"),
                    function,
                    event,
                    region=description.region,
                    concurrency=function.max_concurrency,
                )
                self._sources.append(source)
                self._spawn(f"sqs-{event.queue}", source.run)

    def _start_schedules(self) -> None:
        """EventBridge's scheduled rules: each function with a ``rate(...)`` schedule, on its rate."""
        for name, spec in self.template.functions().items():
            for event in spec.schedule_events:
                self._spawn(f"schedule-{name}", partial(self._tick, self.functions[name], event))

    def _tick(self, function: LocalFunction, event: ScheduleEvent) -> None:
        while not self._stopping.wait(event.interval_seconds):
            payload = {
                "version": "0",
                "id": str(uuid.uuid4()),
                "detail-type": "Scheduled Event",
                "source": "aws.events",
                "account": ACCOUNT_ID,
                "time": rfc3339(utc_now()),
                "region": self.description.region if self.description else "us-east-1",
                "resources": [f"arn:aws:events:::rule/{function.name}-{event.name}"],
                "detail": {},
            }
            try:
                function.invoke(payload)
            except InvocationError as exc:
                log.warning("scheduled %s failed: %s", function.spec.logical_id, exc)

    def _reap(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL_SECONDS):
            for function in self.functions.values():
                function.reap()

    @contextlib.contextmanager
    def streams_paused(self) -> Iterator[None]:
        """Hold the stream pollers (records wait in the stream), e.g. to measure a worker alone."""
        for poller in self._pollers:
            poller.pause()
        try:
            yield
        finally:
            for poller in self._pollers:
                poller.resume()

    def _seed_keys(self) -> None:
        """Register the dev keys the way `spool keys create` does: hashed, in the template's key table."""
        from spool_core import bootstrap
        from spool_core.tenancy import Tenant

        keys = bootstrap.api_keys()
        for key, tenant in self.dev_keys.items():  # kept as restored: links.events name its id
            keys.ensure(key, Tenant(tenant), description="dev key (SPOOL_DEV_KEYS)")

    # ------------------------------------------------------------------ stop
    def stop(self, *, save: bool = True) -> None:
        """Stop everything this stack started; with a state directory, save the state first (once
        no function runs any more, so the snapshot is consistent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._server is not None:
            self._server.closing = True  # before any function stops: no request is answered by one
        for source in self._sources:
            source.stop()
        for poller in self._pollers:
            poller.stop()
        for shutdown in reversed(self._served):
            with contextlib.suppress(Exception):
                shutdown()
        for function in self.functions.values():
            function.shutdown()  # busy containers are killed; their SQS messages are made visible
        deadline = time.monotonic() + 4
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for source in self._sources:  # their invocations have failed: wait for the messages' release
            source.join(deadline)
        for sock in (self._api_socket, self._ws_socket):
            if sock is not None:
                sock.close()
        if save and self.state_dir is not None and self.description is not None:
            try:
                self.saved = LocalState(self.state_dir, self.template, self.description).save()
            except Exception:
                log.exception("could not save the local state to %s", self.state_dir)
        unsaved = self._state_loaded and self.saved is None  # work since the restore no snapshot holds
        FORK_SERVER.stop()
        self.moto.stop()
        if self._state_lock is not None:
            self._state_lock.release(stopped=not unsaved, loaded=self._state_loaded)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
