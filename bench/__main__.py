"""Run every benchmark against one embedded stack and print the figures."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from bench import cold, contexts, cost, fanout, jobs, local, runtime, side_by_side, tenants
from spool.devstack.runtime import CALL_COUNTS_ENV
from spool.devstack.stack import EmbeddedStack

SUITES = ["contexts", "jobs", "runtime", "tenants", "cost", "side", "cold", "fanout", "local"]
# A 30 s lease and visibility timeout (the deployed default is 720 s): the local 5 s would add a
# heartbeat write every ~1.7 s that no deployment makes.
BENCH_PARAMETERS = {"WorkerVisibilityTimeoutSeconds": "30"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("SPOOL_DEV_KEYS", "sk-bench:bench")
    # The benchmarks measure the machinery, not the limits: room for every job they queue.
    os.environ.setdefault("SPOOL_DEFAULT_MAX_CONCURRENT_JOBS", "1000")
    os.environ.setdefault("SPOOL_DEFAULT_TOKENS_PER_MINUTE", "100000000")
    os.environ.setdefault("SPOOL_DEFAULT_TOKENS_PER_DAY", "1000000000")
    selected = args.suites or SUITES
    own_stack = {"tenants", "cost", "side", "cold", "local"}  # each starts a stack of its own (cold: none)
    shared = [name for name in selected if name not in own_stack]
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as counts:
        os.environ[CALL_COUNTS_ENV] = counts
        if shared:
            with EmbeddedStack(port=0, ws_port=0, parameter_overrides=BENCH_PARAMETERS) as stack:
                parameters = ", ".join(f"{k}={v}" for k, v in BENCH_PARAMETERS.items())
                print(f"embedded stack at {stack.base_url} ({parameters})\n")
                for name in shared:
                    if name == "contexts":
                        contexts.run(stack)
                    elif name == "jobs":
                        jobs.run(stack, Path(counts))
                    elif name == "fanout":
                        fanout.run(stack, Path(counts))
                    else:
                        runtime.run(stack)
        if "cold" in selected:
            cold.run()  # fresh interpreters, no stack
        if "tenants" in selected:
            tenants.run()  # a stack of its own, with the deployed per-tenant request budget
        if "cost" in selected:
            cost.run()  # a stack whose containers meter DynamoDB request units
        if "side" in selected:
            side_by_side.run()  # a stack whose registry points at a loopback upstream
        if "local" in selected:
            local.run()  # a moto server of its own, then a fresh stack (the first job after ready)


if __name__ == "__main__":
    main()
