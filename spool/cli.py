"""``spool``: the command line. ``spool dev`` runs the embedded stack."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from spool.devstack.template import parse_parameter_overrides


def _dev(args: argparse.Namespace) -> int:
    from spool.devstack.stack import EmbeddedStack

    stack = EmbeddedStack(
        port=args.port,
        host=args.host,
        config_env=args.config_env,
        parameter_overrides=parse_parameter_overrides(args.parameter_overrides),
        workers=args.workers,
    )
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("spool: starting the embedded stack (moto server, API Gateway emulator, worker)...", flush=True)
    stack.start()
    try:
        print(f"spool: AWS endpoint (moto)  {stack.moto.url}", flush=True)
        print(f"spool: API base URL         {stack.base_url}", flush=True)
        print(f"spool: dev API key          {stack.api_key}", flush=True)
        print(f"spool: try  curl -s {stack.base_url}/v1/health", flush=True)
        print(f"spool: ready on {stack.base_url} (Ctrl-C to stop)", flush=True)
        stopped.wait()
    finally:
        print("spool: stopping...", flush=True)
        stack.stop()
        print("spool: stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="run the embedded stack on this machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("SPOOL_PORT", "8000")))
    dev.add_argument(
        "--config-env", default="local", help="samconfig.toml environment to read (default: local)"
    )
    dev.add_argument(
        "--parameter-overrides",
        default=os.environ.get("SPOOL_PARAMETER_OVERRIDES", ""),
        help="template parameters, as sam deploy takes them: 'Key=Value Key2=Value2'",
    )
    dev.add_argument("--workers", type=int, default=int(os.environ.get("SPOOL_WORKERS", "2")))
    dev.set_defaults(run=_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="spool: %(message)s")  # the devstack's own loggers
    logging.getLogger("botocore").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
