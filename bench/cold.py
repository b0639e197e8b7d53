"""Cold start: what importing each function's handler costs in a fresh interpreter, against the bare
minimum every Python function here pays (boto3 and Powertools' REST resolver).

Each import runs in a new interpreter laid out as Lambda lays out a function: its code directory
first on ``sys.path`` (the working directory), the layer's code (``shared/``) on ``PYTHONPATH``, the
template's plain environment variables, ``LAMBDA_TASK_ROOT`` set. Only the import is timed, inside
the interpreter (its own start is left out on both sides), and in CPU time: an import is CPU-bound
work, and its CPU time moves far less than its wall time on a machine busy with other things. It
still moves: the pydantic floor below measured 1.14-1.24x on a quiet machine and 1.38x in one full
`make bench`. Runs of all handlers are interleaved, and each figure is the median of N.
Every module's bytecode is there, as in the layer ``sam build`` makes (``shared/Makefile`` compiles
it; Lambda's /opt is read-only, and without it each import compiled the layer's modules: 1.0-1.25 s).

The goal (issue 16): every handler's import <= 1.3x the baseline, with tracing off as the local
stack runs (``POWERTOOLS_TRACE_DISABLED``). A second column runs as deployed (``Tracing: Active``),
where the functions that trace also import the X-Ray SDK, for information.

``python -m bench cold`` (or ``python -m bench.cold``); ``SPOOL_BENCH_COLD_RUNS`` sets N (default 5).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spool.devstack.template import FunctionSpec, Template

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
LAYER = ROOT / "shared"
TARGET_RATIO = 1.3
BASELINE = "import boto3; from aws_lambda_powertools.event_handler import APIGatewayRestResolver"
# The floor of a function that reads its settings (a pydantic model, as every function here does):
# the baseline plus pydantic's import and first model (pydantic builds much of itself on first use),
# with pydantic's plugins off as every function runs (the template's Globals): a first model otherwise
# scans every installed package's entry points, ~50 ms in this checkout's virtualenv, which holds
# the whole toolchain where a function holds its own dependencies.
PYDANTIC_FLOOR = (
    f"{BASELINE}; from pydantic import BaseModel; "
    "type('First', (BaseModel,), {'__annotations__': {'x': int}})"
)
FLOOR_ENVIRONMENT = {"PYDANTIC_DISABLE_PLUGINS": "__all__"}
# Loaded by a call that needs them, never by importing a handler (tests/unit/test_cold_imports.py)
HEAVY_MODULES = (
    "openai",  # ~0.6 s: the OpenAI-compatible provider's client, made by the first call to such a model
    "aws_xray_sdk.core",  # ~0.2 s: only where tracing is on
    "aws_lambda_powertools.utilities.parameters",  # Parameters: secrets, SSM, the AppConfig registry
    "aws_lambda_powertools.utilities.feature_flags",  # AppConfig feature flags: evaluated per request
    "tiktoken",  # token counting: the module, and the encoding file (~0.1-0.3 s) on the first count
    "spool_core.providers.bedrock",
    "spool_core.providers.openai_compatible",
    "aws_lambda_powertools.utilities.parser",  # ~25 ms: its event models, never used (spool_core/queue.py)
)
DEFAULT_RUNS = 5


@dataclass(frozen=True)
class Handler:
    name: str  # the template's logical id
    code_dir: Path
    module: str
    spec: FunctionSpec


def handlers(template: Template | None = None) -> list[Handler]:
    """Every Python function of the template: its code directory and the module Lambda imports (a
    web app behind the Lambda Web Adapter is imported by its server, ``module:app``)."""
    template = template or Template.load(TEMPLATE)
    found = []
    for name, spec in sorted(template.functions().items()):
        module = spec.web_app.partition(":")[0] if spec.web_app else spec.handler.rpartition(".")[0]
        found.append(Handler(name, template.root / spec.code_uri, module, spec))
    return found


def environment(handler: Handler | None, *, tracing: bool = False) -> dict[str, str]:
    """The environment of a fresh Lambda execution environment for ``handler`` (None: the baseline)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "en_US.UTF-8",
        "PYTHONPATH": str(LAYER),  # the layer (/opt/python on Lambda)
        "AWS_REGION": "us-east-1",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
    }
    if handler is not None:
        plain = {k: v for k, v in handler.spec.environment.items() if isinstance(v, str | int | float)}
        env.update({k: str(v) for k, v in plain.items()})
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": handler.name,
                "LAMBDA_TASK_ROOT": str(handler.code_dir),
                "_HANDLER": handler.spec.handler,
            }
        )
    env["POWERTOOLS_METRICS_DISABLED"] = "true"
    if not tracing:
        env["POWERTOOLS_TRACE_DISABLED"] = "true"
    return env


def _run(code_dir: Path, statement: str, env: Mapping[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", statement],
        cwd=code_dir,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{statement!r} in {code_dir} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def import_ms(code_dir: Path, statement: str, env: Mapping[str, str]) -> float:
    """One fresh interpreter: the CPU time ``statement`` (the imports) takes, in milliseconds."""
    timed = f"import time; _t = time.process_time(); {statement}; print(time.process_time() - _t)"
    return float(_run(code_dir, timed, env)) * 1000


def loaded(handler: Handler, modules: Iterable[str] = HEAVY_MODULES, *, tracing: bool = False) -> list[str]:
    """Which of ``modules`` importing the handler loads (in a fresh interpreter)."""
    probe = (
        f"import sys, json; import {handler.module}; "
        f"print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    )
    result: list[str] = json.loads(_run(handler.code_dir, probe, environment(handler, tracing=tracing)))
    return result


@dataclass(frozen=True)
class Figures:
    baseline_ms: float
    floor_ms: float
    handlers_ms: dict[str, float]

    def ratio(self, name: str) -> float:
        return self.handlers_ms[name] / self.baseline_ms


def measure(selected: Sequence[Handler], runs: int, *, tracing: bool = False) -> Figures:
    """Median of ``runs`` fresh imports per handler and of the baseline, interleaved round by round,
    after an untimed round that leaves every module's bytecode cached."""
    samples: dict[str, list[float]] = {h.name: [] for h in selected}
    baseline: list[float] = []
    floor: list[float] = []
    for handler in selected:
        import_ms(handler.code_dir, f"import {handler.module}", environment(handler, tracing=tracing))
    for _ in range(runs):
        baseline.append(import_ms(LAYER, BASELINE, environment(None)))
        floor.append(import_ms(LAYER, PYDANTIC_FLOOR, {**environment(None), **FLOOR_ENVIRONMENT}))
        for handler in selected:
            env = environment(handler, tracing=tracing)
            samples[handler.name].append(import_ms(handler.code_dir, f"import {handler.module}", env))
    return Figures(
        statistics.median(baseline),
        statistics.median(floor),
        {name: statistics.median(times) for name, times in samples.items()},
    )


def run(runs: int | None = None) -> bool:
    """Print the figures; True when every handler meets the target (tracing off)."""
    runs = runs or int(os.environ.get("SPOOL_BENCH_COLD_RUNS", DEFAULT_RUNS))
    selected = handlers()
    print(f"== cold start: fresh-interpreter import of each handler, CPU time (median of {runs}) ==")
    off = measure(selected, runs)
    on = measure(selected, runs, tracing=True)
    print(
        f"baseline ({BASELINE}): {off.baseline_ms:.0f} ms; target <= {TARGET_RATIO}x ="
        f" {off.baseline_ms * TARGET_RATIO:.0f} ms\n"
        f"pydantic floor (the baseline, pydantic and a first model): {off.floor_ms:.0f} ms,"
        f" {off.floor_ms / off.baseline_ms:.2f}x"
    )
    width = max(len(h.name) for h in selected)
    met = True
    for handler in selected:
        ratio = off.ratio(handler.name)
        met = met and ratio <= TARGET_RATIO
        heavy = loaded(handler)
        print(
            f"  {handler.name:<{width}}  {off.handlers_ms[handler.name]:6.0f} ms  {ratio:4.2f}x"
            f" {'ok  ' if ratio <= TARGET_RATIO else 'OVER'}"
            f"  (as deployed, X-Ray on: {on.handlers_ms[handler.name]:.0f} ms, {on.ratio(handler.name):.2f}x)"
            + (f"  loads {', '.join(heavy)}" if heavy else "")
        )
    worst = max(selected, key=lambda h: off.ratio(h.name))
    print(
        f"worst: {worst.name} {off.ratio(worst.name):.2f}x of the baseline (target <= {TARGET_RATIO}x):"
        f" {'met' if met else 'NOT met'}\n"
    )
    return met


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
