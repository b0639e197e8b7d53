"""The ``spool`` command (``python -m spool``, and the script pyproject.toml installs): the CLI, with
a Ctrl-C while it loads (its libraries take a few tenths of a second) ending it quietly, exit 130,
instead of with a traceback from somewhere inside an import."""

from __future__ import annotations

import atexit
import signal
import sys
from typing import NoReturn

EXIT_INTERRUPTED = 130  # as spool.cli's own


def main() -> int:
    ignore_ctrl_c_in_teardown()
    try:
        from spool.cli import main as run
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return run()


def ignore_ctrl_c_in_teardown() -> None:
    """Once the exit hooks run, a Ctrl-C is ignored: the command has ended and said how. The
    interpreter's teardown after them puts the default action back on a Python handler, so a Ctrl-C
    in its last few tens of milliseconds killed the process (exit -2 where the command returned 130:
    three quick Ctrl-Cs in ``spool ask``, 8 in 8 tries). Registered first, so run last."""
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


def exit_with(code: int) -> NoReturn:
    """Exit with ``code``, also when a Ctrl-C was handled on the way. CPython (3.12) marks the
    interpreter as interrupted when a KeyboardInterrupt ends a string ``exec``/``eval`` (a dataclass's
    generated methods, say, being built as the Ctrl-C lands), even when a caller then handles it; under
    ``python -m`` it then exits by SIGINT (-2) whatever code it was given. Evaluating a string clears
    that mark (-2 in 3 of 18 `spool dev` starts stopped by two Ctrl-Cs at once)."""
    eval("None")  # noqa: S307 - a constant: clears the mark (see above), nothing else
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
