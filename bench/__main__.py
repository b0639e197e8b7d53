"""Run every benchmark against one embedded stack and print the figures."""

from __future__ import annotations

import argparse
import logging
import os

from bench import contexts
from spool.devstack.provision import free_port
from spool.devstack.stack import EmbeddedStack

SUITES = {"contexts": contexts.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("SPOOL_DEV_KEYS", "sk-bench:bench")
    with EmbeddedStack(port=free_port()) as stack:
        print(f"embedded stack at {stack.base_url}\n")
        for name in args.suites or SUITES:
            SUITES[name](stack)


if __name__ == "__main__":
    main()
