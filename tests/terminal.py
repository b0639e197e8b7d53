"""Reading what a CLI wrote to a terminal: the screen it leaves (through pyte, a terminal emulator)
and the answer text in the byte stream once the status line's own redraws are taken out."""

from __future__ import annotations

import re

import pyte

CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]")
# A status line begins with a spinner frame (braille) and a space, and ends at the carriage return
# of its next redraw, or at the newline rich writes when it stops.
STATUS = re.compile(r"[\u2800-\u28ff] [^\r\n]*(?:\r\n|\r|\n)")


def answer_in(capture: str) -> str:
    """The capture (with a pty's ``\\r\\n`` line ends) as text: escape sequences and every drawing of
    the status line removed, line ends as ``\\n``."""
    text = STATUS.sub("", CSI.sub("", capture))
    return text.replace("\r\n", "\n").replace("\r", "")


def screen_of(capture: str, columns: int, rows: int) -> list[str]:
    """The rows of a ``columns`` x ``rows`` terminal after it received ``capture``, right-trimmed."""
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(capture)
    return [line.rstrip() for line in screen.display]
