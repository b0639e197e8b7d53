"""The ``spool`` command (``python -m spool``, and the script pyproject.toml installs): the CLI, with
a Ctrl-C while it loads (its libraries take a few tenths of a second) ending it quietly, exit 130,
instead of with a traceback from somewhere inside an import."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # as spool.cli's own


def main() -> int:
    try:
        from spool.cli import main as run
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return run()


if __name__ == "__main__":
    sys.exit(main())
