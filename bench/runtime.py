"""The local Lambda runtime: each function's cold start (init duration) and warm invocations, from
the REPORT the runtime records for every invocation, and the import a fresh interpreter pays (what a
cold start costs on Lambda, where no fork server has imported the libraries beforehand)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from spool.devstack.stack import EmbeddedStack


def fresh_import_ms(stack: EmbeddedStack, name: str) -> float:
    """Median of 3 imports of the handler's module in a new interpreter, minus the interpreter's start."""
    assert stack.description is not None
    spec = stack.functions[name].spec
    environment = stack.description.environment_for(stack.template, name)
    # a web app behind the Lambda Web Adapter is imported by its server (``app:app``), not a handler
    module = spec.web_app.partition(":")[0] if spec.web_app else spec.handler.rpartition(".")[0]
    code_dir = stack.template.root / spec.code_uri

    def timed(statement: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], cwd=code_dir, env=environment, check=True)
        return (time.perf_counter() - started) * 1000

    bare = statistics.median(timed("pass") for _ in range(3))
    return statistics.median(timed(f"import {module}") for _ in range(3)) - bare


def run(stack: EmbeddedStack) -> None:
    print("== local runtime (one process per container) ==")
    for name, function in sorted(stack.functions.items()):
        inits = sorted(function.init_durations)
        warm = sorted(r.duration_ms for r in function.reports if r.init_duration_ms is None)
        memory = max((r.max_memory_used_mb for r in function.reports), default=0)
        init = f"init p50 {statistics.median(inits):.0f} ms ({len(inits)} containers)" if inits else "no init"
        invocations = f"warm invocation p50 {statistics.median(warm):.0f} ms" if warm else "no warm call"
        print(
            f"{name}: {init}, {invocations}, max memory used {memory} of {function.spec.memory_mb} MB;"
            f" fresh-interpreter import {fresh_import_ms(stack, name):.0f} ms"
        )
    print()
