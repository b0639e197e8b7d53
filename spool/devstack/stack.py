"""The embedded stack as one object: start it, use ``base_url``, stop it."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3

from spool.devstack.gateway import GatewayHttpServer, RestApiEmulator
from spool.devstack.provision import MotoServer, StackDescription, free_port, provision
from spool.devstack.runtime import LocalFunction
from spool.devstack.streams import StreamPoller
from spool.devstack.template import Template, samconfig_parameters
from spool.devstack.websocket import ManagementApiServer, WebSocketGateway

log = logging.getLogger("devstack")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEV_KEYS = "sk-local-dev:local"
API_LOGICAL_ID = "SpoolApi"
# Variables from the caller's environment that reach the handlers (Spool's knobs, Powertools' own).
PASSTHROUGH_PREFIXES = ("SPOOL_", "POWERTOOLS_")


def parse_dev_keys(text: str) -> dict[str, str]:
    """``key1:tenantA,key2:tenantB`` -> {key: tenant}."""
    keys = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, tenant = pair.partition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"SPOOL_DEV_KEYS entry {pair!r} must look like key:tenant")
        keys[key] = tenant
    return keys


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
        "TIKTOKEN_CACHE_DIR": environ.get("TIKTOKEN_CACHE_DIR", str(PROJECT_ROOT / ".cache" / "tiktoken")),
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    overrides.update(
        {k: v for k, v in environ.items() if k.startswith(PASSTHROUGH_PREFIXES) and k not in computed}
    )
    return overrides


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
        config_env: str = "local",
        parameter_overrides: Mapping[str, str] | None = None,
        dev_keys: str | None = None,
        workers: int = 2,
        moto_port: int | None = None,
    ) -> None:
        self.template = Template.load(template_path)
        self.host = host
        self.port = port
        self.dev_keys = parse_dev_keys(dev_keys or os.environ.get("SPOOL_DEV_KEYS") or DEFAULT_DEV_KEYS)
        stack_name, overrides = samconfig_parameters(self.template.root / "samconfig.toml", config_env)
        self.stack_name = stack_name or "spool-local"
        self.overrides = {**overrides, **(parameter_overrides or {})}
        self.workers = workers
        self.moto = MotoServer(host, moto_port)
        self.description: StackDescription | None = None
        self._server: GatewayHttpServer | None = None
        self._functions: dict[str, LocalFunction] = {}
        self._worker_procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._state_dir = tempfile.TemporaryDirectory(prefix="spool-dev-")
        self._supervisor: threading.Thread | None = None
        self._websocket: WebSocketGateway | None = None
        self._management: ManagementApiServer | None = None
        self._pollers: list[StreamPoller] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        return next(iter(self.dev_keys))

    @property
    def state_path(self) -> Path:
        return Path(self._state_dir.name) / "stack.json"

    def start(self) -> EmbeddedStack:
        self.moto.start()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        description = provision(
            self.template, self.moto.url, stack_name=self.stack_name, overrides=self.overrides
        )
        stage = description.parameters.get("StageName", "prod")
        self._websocket = WebSocketGateway({}, host=self.host, port=self._ws_port(), stage=stage)
        self._management = ManagementApiServer(self._websocket, self.host)
        management_url = f"http://{self.host}:{self._management.server_address[1]}/{stage}"
        description.overrides = {
            **local_overrides(os.environ, self.template),
            "SPOOL_WEBSOCKET_URL": self._websocket.url,
            "SPOOL_WEBSOCKET_MANAGEMENT_URL": management_url,
        }
        description.save(self.state_path)
        self.description = description
        os.environ.update(description.environment(self.template))
        self._seed_keys()

        resolver = description.resolver()
        ws_functions = set(self.template.websocket_routes().values())
        for name, spec in self.template.functions().items():
            if spec.api_events or spec.stream_events or name in ws_functions or name == self._authorizer_id():
                self._functions[name] = LocalFunction(
                    spec, self.template.root, region=description.region, name=resolver.ref(name)
                )
        emulator = RestApiEmulator(
            self.template,
            API_LOGICAL_ID,
            self._functions,
            region=description.region,
            stage=description.parameters.get("StageName", "prod"),
        )
        self._server = GatewayHttpServer((self.host, self.port), emulator)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="api-gateway", daemon=True).start()
        self._start_websocket(description)
        for _ in range(self.workers):
            self._worker_procs.append(self._spawn_worker())
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._supervisor.start()

    def _ws_port(self) -> int:
        configured = os.environ.get("SPOOL_WS_PORT")
        if configured:
            return int(configured)
        return self.port + 1 if self.port else free_port(self.host)

    @property
    def websocket_url(self) -> str:
        return self._websocket.url if self._websocket else ""

    def _start_websocket(self, description: StackDescription) -> None:
        """The WebSocket API, its @connections endpoint, and the stream pollers feeding the fanout."""
        assert self._websocket is not None and self._management is not None
        self._websocket._routes = {
            route: self._functions[name] for route, name in self.template.websocket_routes().items()
        }
        self._websocket.start()
        threading.Thread(target=self._management.serve_forever, name="ws-management", daemon=True).start()
        streams = boto3.session.Session().client(
            "dynamodbstreams", endpoint_url=description.endpoint_url, region_name=description.region
        )
        for name, spec in self.template.functions().items():
            for event in spec.stream_events:
                poller = StreamPoller(
                    streams,
                    description.attributes[f"{event.table}.StreamArn"],
                    self._functions[name],
                    batch_size=event.batch_size,
                    region=description.region,
                )
                self._pollers.append(poller)
                threading.Thread(target=poller.run, name=f"stream-{event.table}", daemon=True).start()

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

    def _authorizer_id(self) -> str | None:
        auth = self.template.api(API_LOGICAL_ID).get("Auth", {})
        name = auth.get("DefaultAuthorizer")
        if not name:
            return None
        return str(auth["Authorizers"][name]["FunctionArn"]["Fn::GetAtt"][0])

    def _seed_keys(self) -> None:
        """Register the dev keys the way `spool keys create` does: hashed, in the template's key table."""
        from spool_core import bootstrap
        from spool_core.tenancy import Tenant

        keys = bootstrap.api_keys()
        for key, tenant in self.dev_keys.items():
            keys.register(key, Tenant(tenant), description="dev key (SPOOL_DEV_KEYS)")

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "spool.devstack.worker_process", "--state", str(self.state_path)],
            env={**os.environ},
        )

    def _supervise(self) -> None:
        """Restart a worker process that died (a crashed invocation), as Lambda starts a new sandbox."""
        while not self._stopping.wait(0.2):
            for index, proc in enumerate(self._worker_procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("worker process exited with %s; starting a new one", proc.returncode)
                    self._worker_procs[index] = self._spawn_worker()

    def stop(self) -> None:
        self._stopping.set()
        for proc in self._worker_procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self._worker_procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for poller in self._pollers:
            poller.stop()
        if self._websocket:
            self._websocket.stop()
        if self._management:
            self._management.shutdown()
            self._management.server_close()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        for function in self._functions.values():
            function.shutdown()
        self.moto.stop()
        self._state_dir.cleanup()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
