"""Running a handler the way Lambda does: loaded from the template's CodeUri and Handler, one
invocation per container at a time, a context object, and the function's timeout."""

from __future__ import annotations

import importlib.util
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spool.devstack.provision import ACCOUNT_ID
from spool.devstack.template import FunctionSpec

HandlerFn = Callable[[Any, Any], Any]
_module_counter = itertools.count(1)


class InvocationTimeout(Exception):
    pass


@dataclass
class LambdaContext:
    """The attributes and method Lambda's Python runtime passes as ``context``."""

    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    timeout_seconds: int
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


def load_handler(spec: FunctionSpec, root: Path) -> HandlerFn:
    """A fresh copy of the handler module: each local 'container' has its own module state."""
    path = root / spec.module_file
    module_name = f"_spool_local_{spec.logical_id}_{next(_module_counter)}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path} for {spec.logical_id}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    handler: HandlerFn = getattr(module, spec.function_name)
    return handler


class LocalFunction:
    """A function with a pool of warm containers; concurrent invocations use different containers."""

    def __init__(
        self, spec: FunctionSpec, root: Path, *, region: str, name: str, max_concurrency: int = 16
    ) -> None:
        self.spec = spec
        self._root = root
        self._region = region
        self._name = name
        self._idle: list[HandlerFn] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=spec.logical_id)

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self._region}:{ACCOUNT_ID}:function:{self._name}"

    def _acquire(self) -> HandlerFn:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return load_handler(self.spec, self._root)

    def _release(self, handler: HandlerFn) -> None:
        with self._lock:
            self._idle.append(handler)

    def context(self) -> LambdaContext:
        return LambdaContext(self._name, self.spec.memory_mb, self.arn, self.spec.timeout)

    def invoke(self, event: Any, timeout: float | None = None) -> Any:
        """Run the handler in a container; raise ``InvocationTimeout`` past the function's timeout.

        A timed-out container is discarded, as Lambda discards a sandbox it had to stop.
        """
        handler = self._acquire()
        context = self.context()
        future = self._executor.submit(handler, event, context)
        try:
            result = future.result(timeout=timeout or self.spec.timeout)
        except FutureTimeout:
            raise InvocationTimeout(
                f"{self.spec.logical_id} timed out after {timeout or self.spec.timeout}s"
            ) from None
        except BaseException:
            self._release(handler)
            raise
        self._release(handler)
        return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
