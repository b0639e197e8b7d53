"""End-to-end tier: `spool dev` started as a user starts it, then plain HTTP against it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import ROOT

# The environment pytest started with: other tiers' fixtures point os.environ at their own moto server.
CLEAN_ENVIRONMENT = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPOOL_"))}
DEV_KEY = "sk-e2e-a"
OTHER_KEY = "sk-e2e-b"


@dataclass
class RunningStack:
    process: subprocess.Popen[str]
    base_url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        key: str | None = DEV_KEY,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310 - loopback
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
                raw = response.read()
                return response.status, dict(response.headers), json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            return error.code, dict(error.headers), json.loads(raw) if raw else None


READY = re.compile(r"ready on (http://\S+)")


def start_stack(extra_env: dict[str, str] | None = None, timeout: float = 90) -> RunningStack:
    """`spool dev` on ports of its own choosing (SPOOL_PORT=0), read from its `ready` line."""
    env = {
        **CLEAN_ENVIRONMENT,
        "SPOOL_PORT": "0",
        "SPOOL_DEV_KEYS": f"{DEV_KEY}:tenant-a,{OTHER_KEY}:tenant-b",
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "spool.cli", "dev"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack = RunningStack(process, "")
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stack.output.append(line.rstrip())
            if found := READY.search(line):
                stack.base_url = found.group(1)
                ready.set()

    stack.reader = threading.Thread(target=pump, daemon=True)
    stack.reader.start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("spool dev did not become ready:\n" + "\n".join(stack.output))
    return stack


def stop_stack(stack: RunningStack) -> int:
    stack.process.send_signal(signal.SIGTERM)
    try:
        code = stack.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        raise
    if stack.reader:
        stack.reader.join(timeout=5)
    return code


E2E_MAX_CONTEXT_BYTES = 1024 * 1024
# SSE streams end this soon (840 s on AWS), so every streaming test also crosses reconnects.
STREAM_MAX_SECONDS = 3


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[RunningStack]:
    stack = start_stack(
        {
            "SPOOL_MAX_CONTEXT_BYTES": str(E2E_MAX_CONTEXT_BYTES),
            "SPOOL_SIMULATOR_FAULTS": "1",
            "SPOOL_STREAM_MAX_SECONDS": str(STREAM_MAX_SECONDS),
        }
    )
    yield stack
    stop_stack(stack)
