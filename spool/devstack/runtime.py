"""Lambda's execution model, locally.

Each warm container of a function is its own OS process: it starts with the function's environment
from the template, imports the handler once (the init phase), then receives one event at a time and
sends back the result. A function keeps a pool of containers that grows on demand up to its
concurrency limit and shrinks when containers stay idle. A timed-out invocation kills its container
(as Lambda stops a sandbox), and so does a crash; neither touches the caller's process.

Containers are forked from a fork server that has already imported the heavy third-party libraries
(boto3, Powertools, pydantic, tiktoken), so a new container costs the import of Spool's own code and
the handler (Lambda's init phase), not a whole interpreter start. Nothing of Spool is imported before
the fork: module-level state (Powertools' logger and resolver, cached services) is each container's own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import itertools
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

from spool.devstack.provision import ACCOUNT_ID
from spool.devstack.template import FunctionSpec

log = logging.getLogger("devstack.lambda")
DEFAULT_CONCURRENCY = 16  # per function, where the template reserves none
DEFAULT_WAIT_SECONDS = 30.0  # how long a caller waits for a free container (no Lambda counterpart)
# Before a cold start, wait a little for a warm container to come free (about one warm invocation's
# duration, within these bounds): a burst on a 2-core machine is then served by a few warm
# containers instead of paying a cold start per request (see docs/decisions.md).
SCALE_UP_DELAY_BOUNDS = (0.05, 0.5)
SCALE_UP_DELAY_DEFAULT = 0.25
IDLE_SECONDS = 120.0  # an idle container is reaped after this long (the pool keeps its last one)
# Imported once in the fork server, so each container starts warm on them. Only third-party code:
# Spool's own modules build state at import (Powertools' logger) from the function's environment.
PRELOAD = (
    "boto3",
    "botocore.session",
    "botocore.client",
    "pydantic",
    "aws_lambda_powertools.event_handler",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.metrics",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.data_classes",
    "tiktoken",
    "openai",
    "aws_xray_sdk.core",
)
ENCODINGS = ("cl100k_base", "o200k_base")  # tiktoken's, as Spool's token counts use them
CALL_COUNTS_ENV = "SPOOL_DEVSTACK_CALL_COUNTS"  # benchmarks: each container counts its AWS calls here
TRACEMALLOC_ENV = "SPOOL_DEVSTACK_TRACEMALLOC"  # benchmarks: report each invocation's peak allocation


class InvocationError(Exception):
    """The invocation did not return a result (Lambda's "function error" as the caller sees it)."""


class InvocationTimeout(InvocationError):
    pass


class InvocationCrashed(InvocationError):
    """The container's process died during the invocation (an out-of-memory kill, ``os._exit``)."""


class InvocationThrottled(InvocationError):
    """Every container the function may have is busy for longer than the caller waits."""


class HandlerError(InvocationError):
    """The handler raised: Lambda's ``errorType``/``errorMessage``/``stackTrace``."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        super().__init__(f"{payload.get('errorType')}: {payload.get('errorMessage')}")
        self.payload = dict(payload)


@dataclass
class LambdaContext:
    """The attributes and method Lambda's Python runtime passes as ``context``."""

    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    timeout_seconds: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = "local"
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.log_group_name = f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        elapsed = time.monotonic() - self._started
        return max(0, int((self.timeout_seconds - elapsed) * 1000))


@dataclass(frozen=True)
class Report:
    """What Lambda's ``REPORT`` log line says about one invocation."""

    function: str
    request_id: str
    duration_ms: float
    memory_mb: int
    max_memory_used_mb: int
    init_duration_ms: float | None = None  # set on a container's first invocation (a cold start)
    outcome: str = "result"  # result | error | timeout | crash
    peak_allocation_bytes: int | None = None  # with TRACEMALLOC_ENV (benchmarks)
    # The container's CPU time in the invocation (not in Lambda's REPORT): on AWS a function gets a
    # share of a vCPU proportional to its memory, so CPU-bound work runs longer there than here
    # (bench/cost.py estimates the billed duration from both).
    cpu_ms: float | None = None

    def line(self) -> str:
        billed = max(1, math.ceil(self.duration_ms))
        text = (
            f"REPORT RequestId: {self.request_id}\tFunction: {self.function}\t"
            f"Duration: {self.duration_ms:.2f} ms\tBilled Duration: {billed} ms\t"
            f"Memory Size: {self.memory_mb} MB\tMax Memory Used: {self.max_memory_used_mb} MB"
        )
        if self.init_duration_ms is not None:
            text += f"\tInit Duration: {self.init_duration_ms:.2f} ms"
        if self.outcome != "result":
            text += f"\tStatus: {self.outcome}"
        return text


# ---------------------------------------------------------------------------------------- the container
def _exit_with_parent() -> None:
    """End this process when its parent (the fork server) ends: after a SIGKILL of the stack, the fork
    server sees its control socket close and exits, and its containers follow."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _load_handler(spec: FunctionSpec, root: str) -> Callable[[Any, Any], Any]:
    """Import the handler the way Lambda does: the function's code directory first on ``sys.path``."""
    if _PRELOADED is not None:
        return cast(Callable[[Any, Any], Any], _PRELOADED)
    import importlib

    sys.path.insert(0, str(Path(root) / spec.code_uri))
    module_name = spec.handler.rpartition(".")[0]
    module = importlib.import_module(module_name)
    handler: Callable[[Any, Any], Any] = getattr(module, spec.function_name)
    return handler


def _load_web_app(spec: FunctionSpec, root: str) -> Any:
    """Import a web function's ASGI app (``module:attribute``), as its start script does."""
    if _PRELOADED is not None:
        return _PRELOADED
    import importlib

    module_name, _, attribute = str(spec.web_app).partition(":")
    sys.path.insert(0, str(Path(root) / spec.code_uri))
    return getattr(importlib.import_module(module_name), attribute)


# In a function's fork server: its handler (or web app), imported once with the function's environment;
# every container forked from it starts with its init done (see ``preload_function``).
_PRELOADED: Any = None
_PRELOAD_MS = 0.0


def preload_function(spec: FunctionSpec, environment: Mapping[str, str], root: str) -> None:
    """Make this process a function's fork server: its environment, then its handler or web app
    imported (the init phase every container of it would repeat). Its containers are forked from
    here, so they start warm, as a pool of execution environments would; the first container's init
    reports the time this took."""
    global _PRELOADED, _PRELOAD_MS
    started = time.perf_counter()
    os.environ.clear()
    os.environ.update(environment)
    try:
        _PRELOADED = _load_web_app(spec, root) if spec.web_app else _load_handler(spec, root)
    except BaseException:  # each container imports it again, and reports the init error
        _PRELOADED = None
    else:
        with contextlib.suppress(Exception):  # a hook that fails leaves its work to the first call
            _run_snapshot_hooks("_before_snapshot_registry")
        if spec.web_app:  # what uvicorn imports as it starts (its protocols, its loop), once here
            with contextlib.suppress(Exception):
                _uvicorn_config(
                    _PRELOADED, os.path.join(tempfile.gettempdir(), "spool-web-preload.sock")
                ).load()
    _PRELOAD_MS = (time.perf_counter() - started) * 1000


def _run_snapshot_hooks(registry: str) -> None:
    """Run the SnapStart runtime hooks the function registered (``snapshot_restore_py``), as Lambda
    does around a snapshot: a function fork server is this stack's snapshot of an initialized
    function. The library keeps its hooks in these lists; Lambda's runtime reads them the same way."""
    hooks = sys.modules.get("snapshot_restore_py")
    for hook, args, kwargs in getattr(hooks, registry, ()):
        hook(*args, **kwargs)


def forked_container() -> None:
    """In a fork server, once a container was forked: the next ones did not pay the preload."""
    global _PRELOAD_MS
    _PRELOAD_MS = 0.0


def _max_rss_mb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def send_frame(sock: socket.socket, message: Any) -> None:
    """One message on a container's channel: 8-byte length, then JSON (Lambda's payloads are JSON)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(len(data).to_bytes(8, "big") + data)


def recv_frame(sock: socket.socket) -> Any:
    """The next message; ``EOFError`` when the other side has gone."""
    header = _recv_exactly(sock, 8)
    return json.loads(_recv_exactly(sock, int.from_bytes(header, "big")))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise EOFError("channel closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def container_main(
    channel: socket.socket, spec: FunctionSpec, environment: dict[str, str], root: str
) -> None:
    """One execution environment: init, then one invocation at a time until the pool closes it."""
    os.setsid()  # the terminal's Ctrl-C goes to `spool dev`, which stops its containers itself
    _exit_with_parent()
    os.environ.clear()
    os.environ.update(environment)
    if environment.get(CALL_COUNTS_ENV):
        from spool.devstack.instrument import AwsCallCounter

        dump = Path(environment[CALL_COUNTS_ENV]) / f"{spec.logical_id}-{os.getpid()}.json"
        AwsCallCounter(dump).install()
    tracing = bool(environment.get(TRACEMALLOC_ENV))
    started = time.perf_counter() - _PRELOAD_MS / 1000  # the first container of a fork server paid it
    if _PRELOADED is not None:  # restored from the fork server's snapshot
        _run_snapshot_hooks("_after_restore_registry")
    if spec.web_app:
        _serve_web_app(channel, spec, root, started)
        return
    try:
        handler = _load_handler(spec, root)
    except BaseException as exc:  # an init error fails every invocation of this container, as on Lambda
        send_frame(channel, {"kind": "init_error", "error": _error_payload(exc)})
        return
    send_frame(channel, {"kind": "ready", "init_ms": (time.perf_counter() - started) * 1000})
    while True:
        try:
            message = recv_frame(channel)
        except (EOFError, OSError):
            return
        if message["kind"] == "stop":
            return
        context = LambdaContext(**message["context"])
        send_frame(channel, _invoke(handler, message["event"], context, tracing))


def _serve_web_app(channel: socket.socket, spec: FunctionSpec, root: str, started: float) -> None:
    """A container of a function run by Lambda Web Adapter: the init phase imports the ASGI app and
    starts it under uvicorn (as the function's start script does) on this container's own Unix
    socket, then passes the adapter's readiness check; the caller sends each invocation to it as an
    HTTP request and relays the response as it streams."""
    import uvicorn

    try:
        app = _load_web_app(spec, root)
    except BaseException as exc:
        send_frame(channel, {"kind": "init_error", "error": _error_payload(exc)})
        return
    path = os.path.join(tempfile.gettempdir(), f"spool-web-{os.getpid()}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = uvicorn.Server(_uvicorn_config(app, path))
    serving = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    serving.start()
    try:
        _wait_ready(path, spec.readiness_path, serving, time.monotonic() + 30)
    except Exception as exc:
        send_frame(channel, {"kind": "init_error", "error": _error_payload(exc)})
        return
    send_frame(channel, {"kind": "ready", "init_ms": (time.perf_counter() - started) * 1000, "socket": path})
    while True:
        try:
            message = recv_frame(channel)
        except (EOFError, OSError):
            break
        if message["kind"] == "stop":
            break
    server.should_exit = True
    serving.join(timeout=2)
    with contextlib.suppress(OSError):
        os.unlink(path)


def _uvicorn_config(app: Any, path: str) -> Any:
    import uvicorn

    return uvicorn.Config(app, uds=path, log_config=None, access_log=False, lifespan="off")


def _wait_ready(path: str, readiness_path: str, serving: threading.Thread, deadline: float) -> None:
    """The adapter's readiness check: GET the path until it answers below 500."""
    while time.monotonic() < deadline:
        if not serving.is_alive():
            raise RuntimeError("the web app's server exited during start")
        connection = UnixHTTPConnection(path, timeout=2)
        try:
            connection.request("GET", readiness_path)
            if connection.getresponse().status < 500:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.01)
    raise RuntimeError(f"the web app did not pass its readiness check ({readiness_path})")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a server listening on a Unix socket (a web container's)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _invoke(
    handler: Callable[[Any, Any], Any], event: Any, context: LambdaContext, tracing: bool
) -> dict[str, Any]:
    import tracemalloc

    if tracing:
        tracemalloc.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        answer: dict[str, Any] = {"kind": "result", "result": handler(event, context)}
        json.dumps(answer)  # Lambda serializes the result; an unserializable one is a function error
    except Exception as exc:
        answer = {"kind": "error", "error": _error_payload(exc)}
    answer["stats"] = {
        "duration_ms": (time.perf_counter() - started) * 1000,
        "max_rss_mb": _max_rss_mb(),
        "cpu_ms": (time.process_time() - cpu_started) * 1000,
    }
    if tracing:
        answer["stats"]["peak_allocation_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return answer


def _error_payload(exc: BaseException) -> dict[str, Any]:
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_exception(exc),
    }


@dataclass
class _FunctionServer:
    """A function's fork server: its control socket once started; its lock orders the requests."""

    control: socket.socket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ForkServer:
    """The process containers are forked from (``python -m spool.devstack.zygote``): it has imported
    the third-party libraries once. For each function (and environment) it forks a fork server of its
    own that imports the function's handler with the function's environment; that one forks the
    function's containers, which start with their init done (20 containers started at once used to
    repeat ~0.5 s of imports each, on a machine of two cores)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._functions: dict[str, _FunctionServer] = {}
        self._environment: dict[str, str] = {}

    def start(self, environment: Mapping[str, str] | None = None) -> None:
        """Start the fork server now (its imports take a while) rather than at the first container;
        ``environment``: variables its imports read (where tiktoken's encodings are)."""
        with self._lock:
            self._environment.update(environment or {})
            self._ensure()

    def _ensure(self) -> socket.socket:
        if self._control is not None and self._process is not None and self._process.poll() is None:
            return self._control
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "spool.devstack.zygote", str(theirs.fileno()), *PRELOAD],
            pass_fds=[theirs.fileno()],
            env={**os.environ, **self._environment, "SPOOL_DEVSTACK_ENCODINGS": ",".join(ENCODINGS)},
            start_new_session=True,  # the terminal's Ctrl-C is for `spool dev` alone
        )
        theirs.close()
        if ours.recv(16) != b"ready":
            raise InvocationCrashed("the fork server did not start")
        self._control = ours
        return ours

    def spawn(
        self, spec: FunctionSpec, environment: Mapping[str, str], root: Path
    ) -> tuple[int, socket.socket]:
        """A new container process; returns its pid and our end of its channel."""
        request = json.dumps(
            {"spec": _spec_data(spec), "environment": dict(environment), "root": str(root)}
        ).encode()
        server = self._function_server(hashlib.sha256(request).hexdigest(), spec, request)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with server.lock:
                reply = b""
                if server.control is not None:
                    with contextlib.suppress(OSError):
                        socket.send_fds(server.control, [request], [theirs.fileno()])
                        reply = server.control.recv(1024)
                    if not reply:  # the next container of this function starts a new fork server
                        server.control.close()
                        server.control = None
        finally:
            theirs.close()
        if not reply:
            ours.close()
            raise InvocationCrashed("the fork server exited")
        return int(json.loads(reply)["pid"]), ours

    def _function_server(self, key: str, spec: FunctionSpec, request: bytes) -> _FunctionServer:
        """The fork server of this function and environment, started (from the shared one) the first
        time a container of it is wanted. Only the request to the shared one holds the shared lock:
        functions' fork servers import their handlers at once, each in its own process."""
        with self._lock:
            server = self._functions.setdefault(key, _FunctionServer())
        with server.lock:
            if server.control is not None:
                return server
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with self._lock:
                    control = self._ensure()
                    started = json.dumps({"kind": "function", **json.loads(request)}).encode()
                    socket.send_fds(control, [started], [theirs.fileno()])
                    reply = control.recv(1024)
            finally:
                theirs.close()
            if not reply or ours.recv(16) != b"ready":
                ours.close()
                raise InvocationCrashed(f"the fork server of {spec.logical_id} did not start")
            server.control = ours
            return server

    def stop(self) -> None:
        with self._lock:
            for server in self._functions.values():
                if server.control is not None:
                    server.control.close()
            self._functions.clear()
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._process is not None:
                try:
                    self._process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
                self._process = None


def _spec_data(spec: FunctionSpec) -> dict[str, Any]:
    return {
        "logical_id": spec.logical_id,
        "code_uri": spec.code_uri,
        "handler": spec.handler,
        "timeout": spec.timeout,
        "memory_mb": spec.memory_mb,
        "environment": {},
        "web_app": spec.web_app,
        "readiness_path": spec.readiness_path,
    }


FORK_SERVER = ForkServer()


class Container:
    """The caller's handle on one container process."""

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str], root: Path, number: int) -> None:
        self.pid, self._channel = FORK_SERVER.spawn(spec, environment, root)
        self.number = number
        self.init_duration_ms: float | None = None
        self._fresh = True
        self.last_used = time.monotonic()

    def _receive(self, timeout: float) -> Any:
        self._channel.settimeout(timeout)
        try:
            return recv_frame(self._channel)
        except TimeoutError:
            self.kill()
            raise InvocationTimeout(f"no answer within {timeout:g}s") from None
        except (EOFError, OSError):
            self.kill()
            raise InvocationCrashed("the container's process exited") from None

    def wait_ready(self, timeout: float) -> float:
        """Wait for the init phase; returns its duration in ms."""
        message = self._receive(timeout)
        if message["kind"] == "init_error":
            self.kill()
            raise HandlerError(message["error"])
        self.init_duration_ms = float(message["init_ms"])
        self.socket_path: str | None = message.get("socket")  # a web container's server
        return self.init_duration_ms

    def invoke(self, event: Any, context: LambdaContext, timeout: float) -> dict[str, Any]:
        context_data = {
            "function_name": context.function_name,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "invoked_function_arn": context.invoked_function_arn,
            "timeout_seconds": context.timeout_seconds,
            "aws_request_id": context.aws_request_id,
        }
        try:
            send_frame(self._channel, {"kind": "invoke", "event": event, "context": context_data})
        except OSError:
            self.kill()
            raise InvocationCrashed("the container's process exited") from None
        answer: dict[str, Any] = self._receive(timeout)
        self.last_used = time.monotonic()
        return answer

    def first_use(self) -> bool:
        fresh, self._fresh = self._fresh, False
        return fresh

    def alive(self) -> bool:
        """Whether the process is still there to take an invocation: an idle container's channel has
        nothing to read, and reads as closed once its process has died (killed, or out of memory)."""
        timeout = self._channel.gettimeout()
        try:
            self._channel.setblocking(False)
            try:
                return bool(self._channel.recv(1, socket.MSG_PEEK))  # b"": the other end is gone
            finally:
                self._channel.settimeout(timeout)
        except BlockingIOError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Ask the container to end: it returns from its loop and exits through the interpreter (so a
        coverage run measuring it saves its data)."""
        with contextlib.suppress(OSError):
            send_frame(self._channel, {"kind": "stop"})

    def wait_exit(self, deadline: float) -> None:
        """Wait for the process to end (the fork server reaps it), then make sure it has."""
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        self.kill()

    def close(self, timeout: float = 2.0) -> None:
        self.stop()
        self.wait_exit(time.monotonic() + timeout)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._channel.close()


# ---------------------------------------------------------------------------------------- the pool
class LocalFunction:
    """A function: a pool of containers, one invocation per container at a time."""

    reports_start = True  # ``invoke`` takes ``on_start`` (the SQS event source relies on it)

    def __init__(
        self,
        spec: FunctionSpec,
        root: Path,
        *,
        region: str,
        name: str,
        environment: Mapping[str, str],
        max_concurrency: int | None = None,
        idle_seconds: float = IDLE_SECONDS,
        scale_up_delay: float | None = None,
    ) -> None:
        self.spec = spec
        self._root = root
        self._region = region
        self._name = name
        self._environment = dict(environment)
        self.max_concurrency = max_concurrency or spec.reserved_concurrency or DEFAULT_CONCURRENCY
        self._idle_seconds = idle_seconds
        self._scale_up_delay = scale_up_delay
        self._idle: list[Container] = []
        self._busy: set[Container] = set()
        self._live = 0
        self._numbers = itertools.count(1)
        self._changed = threading.Condition()
        self._closed = False
        self.reports: deque[Report] = deque(maxlen=2000)
        self.init_durations: deque[float] = deque(maxlen=2000)  # of every container started

    @property
    def name(self) -> str:
        return self._name

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self._region}:{ACCOUNT_ID}:function:{self._name}"

    @property
    def containers(self) -> int:
        with self._changed:
            return self._live

    def context(self, timeout: float) -> LambdaContext:
        return LambdaContext(self._name, self.spec.memory_mb, self.arn, timeout)

    # ------------------------------------------------------------------ containers
    def _patience(self) -> float:
        """How long to wait for a warm container before starting a new one."""
        if self._scale_up_delay is not None:
            return self._scale_up_delay
        warm = sorted(r.duration_ms for r in list(self.reports)[-50:] if r.init_duration_ms is None)
        if not warm:
            return SCALE_UP_DELAY_DEFAULT
        low, high = SCALE_UP_DELAY_BOUNDS
        return min(high, max(low, warm[len(warm) // 2] / 1000))

    def _acquire(self, deadline: float) -> Container:
        """An idle container, else a new one (after a short wait for an idle one), else wait."""
        patience = time.monotonic() + self._patience()
        with self._changed:
            while True:
                if self._closed:
                    raise InvocationError(f"{self.spec.logical_id} is shut down")
                if self._idle:
                    container = self._idle.pop()  # the most recently used: warm, as Lambda reuses
                    if not container.alive():  # died while idle: Lambda never hands a dead one a request
                        container.kill()
                        self._live -= 1
                        continue
                    self._busy.add(container)
                    return container
                now = time.monotonic()
                room = self._live < self.max_concurrency
                if room and now >= patience:
                    self._live += 1
                    break
                if now >= deadline:
                    raise InvocationThrottled(
                        f"{self.spec.logical_id}: all {self.max_concurrency} containers are busy"
                    )
                self._changed.wait(min(patience if room else deadline, deadline) - now)
        try:
            container = self._start_container(deadline)
        except BaseException:
            self._forget()
            raise
        with self._changed:
            self._busy.add(container)
        return container

    def _start_container(self, deadline: float) -> Container:
        container = Container(self.spec, self._environment, self._root, next(self._numbers))
        try:
            self.init_durations.append(container.wait_ready(max(1.0, deadline - time.monotonic())))
        except BaseException:
            container.kill()
            raise
        return container

    def _release(self, container: Container) -> None:
        with self._changed:
            self._busy.discard(container)
            if self._closed:
                container.close()
                return
            self._idle.append(container)
            self._changed.notify_all()  # an acquirer, and anyone in wait_idle

    def _discard(self, container: Container) -> None:
        container.kill()
        with self._changed:
            self._busy.discard(container)
        self._forget()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no invocation is in flight (a streamed one ends when the gateway closes it,
        after the client has its answer); False if one still is after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def _forget(self) -> None:
        with self._changed:
            self._live -= 1
            self._changed.notify_all()

    def warm(self, count: int = 1) -> None:
        """Start containers ahead of the first invocation (so it is not a cold start)."""
        started = []
        for _ in range(count):
            with self._changed:
                if self._live >= self.max_concurrency or self._closed:
                    break
                self._live += 1
            try:
                started.append(self._start_container(time.monotonic() + 60))
            except BaseException:
                self._forget()
                raise
        for container in started:
            self._release(container)

    def reap(self, keep: int = 1) -> int:
        """Close containers idle for longer than the idle limit, keeping ``keep`` warm; returns how many."""
        now = time.monotonic()
        with self._changed:
            stale = [c for c in self._idle if now - c.last_used > self._idle_seconds]
            stale = stale[: max(0, len(self._idle) - keep)]
            for container in stale:
                self._idle.remove(container)
                self._live -= 1
        for container in stale:
            container.close()
        return len(stale)

    def shutdown(self) -> None:
        """Close every container; busy ones are killed (their invocations fail)."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for container in idle:
            container.stop()
        deadline = time.monotonic() + 2.0
        for container in idle:
            container.wait_exit(deadline)
        self._kill_busy()

    def _kill_busy(self) -> None:
        with self._changed:
            busy = list(self._busy)
        for container in busy:
            container.kill()

    # ------------------------------------------------------------------ invoke
    def invoke(
        self,
        event: Any,
        timeout: float | None = None,
        wait: float = DEFAULT_WAIT_SECONDS,
        on_start: Callable[[], None] | None = None,
    ) -> Any:
        """Run the handler in a container and return its result. Raises ``HandlerError`` when the
        handler raised, ``InvocationTimeout`` past ``timeout`` (default: the function's; the container
        is killed), ``InvocationCrashed`` when the container died, ``InvocationThrottled`` when no
        container became free within ``wait`` seconds. As on Lambda, a cold start's init and the wait
        for a container are not part of the timeout. ``on_start`` is called once a container is
        ready, as the event is handed to the handler (after any cold start)."""
        limit = float(timeout or self.spec.timeout)
        container = self._acquire(time.monotonic() + wait)
        if on_start is not None:
            on_start()
        context = self.context(limit)
        cold = container.first_use()
        started = time.monotonic()
        outcome, stats = "crash", {"duration_ms": 0.0, "max_rss_mb": 0}
        try:
            answer = container.invoke(event, context, limit)
            outcome, stats = answer["kind"], answer["stats"]
        except InvocationError as exc:
            stats["duration_ms"] = (time.monotonic() - started) * 1000
            self._discard(container)
            if isinstance(exc, InvocationTimeout):
                outcome = "timeout"
                raise InvocationTimeout(f"{self.spec.logical_id} timed out after {limit:g}s") from None
            raise InvocationCrashed(f"{self.spec.logical_id}: {exc}") from None
        finally:
            self._report(context, container, cold, outcome, stats)
        self._release(container)
        if answer["kind"] == "error":
            raise HandlerError(answer["error"])
        return answer["result"]

    def open_stream(
        self, event: Mapping[str, Any], timeout: float | None = None, wait: float = DEFAULT_WAIT_SECONDS
    ) -> StreamedResponse:
        """Invoke a web function with an API Gateway proxy event, through response streaming: what
        Lambda Web Adapter does with it inside the sandbox (``adapter_request``), then ``open_http``."""
        return self.open_http(adapter_request(event), timeout, wait)

    def open_http(
        self, request: HttpRequest, timeout: float | None = None, wait: float = DEFAULT_WAIT_SECONDS
    ) -> StreamedResponse:
        """Invoke a web function (one run by Lambda Web Adapter) with an HTTP request, as the adapter
        does inside the sandbox: its status and headers come back at once, its body as it is produced
        (``StreamedResponse.chunks``). The container stays busy until the response is closed; past
        ``timeout`` (default: the function's) it is killed, as Lambda ends an invocation."""
        if not self.spec.web_app:
            raise InvocationError(f"{self.spec.logical_id} is not a web app")
        limit = float(timeout or self.spec.timeout)
        container = self._acquire(time.monotonic() + wait)
        context = self.context(limit)
        cold = container.first_use()
        assert container.socket_path is not None
        connection = UnixHTTPConnection(container.socket_path, timeout=limit)
        lambda_context = {
            "request_id": context.aws_request_id,
            "deadline": int((time.time() + limit) * 1000),
            "invoked_function_arn": context.invoked_function_arn,
        }
        headers = {**request.headers, "x-amzn-lambda-context": json.dumps(lambda_context)}
        invocation = StreamedResponse(self, container, connection, context, cold, time.monotonic() + limit)
        try:
            connection.request(request.method, request.target, body=request.body or None, headers=headers)
            invocation.start(connection.getresponse())
        except BaseException as exc:
            invocation.fail(exc)
            raise invocation.error(exc) from None
        return invocation

    def _finish(self, container: Container, healthy: bool) -> None:
        if healthy:
            container.last_used = time.monotonic()
            self._release(container)
        else:
            self._discard(container)

    def _report(
        self, context: LambdaContext, container: Container, cold: bool, outcome: str, stats: dict[str, Any]
    ) -> None:
        report = Report(
            function=self.spec.logical_id,
            request_id=context.aws_request_id,
            duration_ms=float(stats["duration_ms"]),
            memory_mb=self.spec.memory_mb,
            max_memory_used_mb=int(stats["max_rss_mb"]),
            init_duration_ms=container.init_duration_ms if cold else None,
            outcome=outcome,
            peak_allocation_bytes=stats.get("peak_allocation_bytes"),
            cpu_ms=stats.get("cpu_ms"),
        )
        self.reports.append(report)
        log.debug("%s", report.line())


# ---------------------------------------------------------------------------------------- web functions
@dataclass(frozen=True)
class HttpRequest:
    """What Lambda Web Adapter sends the web app for one invocation."""

    method: str
    target: str  # path and query string
    headers: Mapping[str, str]
    body: bytes = b""


_FRAMING = {"transfer-encoding", "content-length", "connection", "keep-alive"}


def adapter_request(event: Mapping[str, Any]) -> HttpRequest:
    """The HTTP request Lambda Web Adapter makes of a REST proxy event: the path without the stage,
    the query string, the headers, the body, and the request context (the authorizer's output with
    it) as JSON in ``x-amzn-request-context`` (the adapter overwrites any copy a client sent)."""
    query = urlencode(
        [(k, v) for k, values in (event.get("multiValueQueryStringParameters") or {}).items() for v in values]
    )
    # The body is whole in the event: its framing is the adapter's own (a length), never the client's
    # (a chunked one forwarded with the bytes already read left the app waiting for chunks).
    headers = {
        k: v
        for k, v in (event.get("headers") or {}).items()
        if not k.lower().startswith("x-amzn-") and k.lower() not in _FRAMING
    }
    headers["x-amzn-request-context"] = json.dumps(event.get("requestContext") or {}, separators=(",", ":"))
    body = event.get("body") or ""
    raw = base64.b64decode(body) if event.get("isBase64Encoded") else str(body).encode()
    target = quote(str(event["path"])) + (f"?{query}" if query else "")
    return HttpRequest(str(event["httpMethod"]), target, headers, raw)


class StreamedResponse:
    """One invocation of a web function in flight: ``status`` and ``headers`` at once, the body from
    ``chunks()`` as the app writes it. ``close()`` ends the invocation (the container is released, or
    killed if it failed) and reports it; closing early is what a client disconnecting does."""

    def __init__(
        self,
        function: LocalFunction,
        container: Container,
        connection: UnixHTTPConnection,
        context: LambdaContext,
        cold: bool,
        deadline: float,
    ) -> None:
        self._function = function
        self._container = container
        self._connection = connection
        self._context = context
        self._cold = cold
        self._deadline = deadline
        self._started = time.monotonic()
        self._cpu_started = _cpu_ms(container.pid)
        self._response: http.client.HTTPResponse | None = None
        self._outcome = "result"
        self._closed = False
        self.status = 0
        self.headers: list[tuple[str, str]] = []

    def start(self, response: http.client.HTTPResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]

    def chunks(self) -> Iterator[bytes]:
        """The body as it streams; raises ``InvocationTimeout`` past the function's time limit and
        ``InvocationCrashed`` when the container dies mid-response."""
        assert self._response is not None
        while True:
            remaining = self._deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                if self._connection.sock is not None:
                    self._connection.sock.settimeout(remaining)
                data = self._response.read1(65536)
            except BaseException as exc:
                self.fail(exc)
                raise self.error(exc) from None
            if not data:
                self.close()
                return
            yield data

    def fail(self, exc: BaseException) -> None:
        self._outcome = "timeout" if isinstance(exc, TimeoutError) else "crash"
        self._end(healthy=False)

    def error(self, exc: BaseException) -> InvocationError:
        name = self._function.spec.logical_id
        if isinstance(exc, TimeoutError):
            return InvocationTimeout(f"{name} timed out after {self._context.timeout_seconds:g}s")
        return InvocationCrashed(f"{name}: the container's response broke off ({exc!r})")

    def close(self) -> None:
        self._end(healthy=True)

    def _end(self, healthy: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._connection.close()
        stats = {
            "duration_ms": (time.monotonic() - self._started) * 1000,
            "max_rss_mb": _peak_rss_mb(self._container.pid),
            "cpu_ms": _cpu_ms(self._container.pid) - self._cpu_started,
        }
        self._function._report(self._context, self._container, self._cold, self._outcome, stats)
        self._function._finish(self._container, healthy)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


def _cpu_ms(pid: int) -> float:
    """A process's CPU time so far (user and system, all threads), in ms; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> int:
    """A container's peak memory (VmHWM), as Lambda's REPORT line gives it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0
