"""How a context is laid out in the prompt: one system message, a preamble, each file with its path,
then the symbols.

The worker renders prompts with these functions and the token counter counts with them, so the
count a client sees before a job is the count of what the model is sent (each file's tokens counted
on their own: a few tokens more than the joined text, never fewer in practice).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any, Final


def _attribute(value: str) -> str:
    """``value`` as an attribute the model reads back as written and that cannot end the tag:
    quotes, angle brackets, ampersands and control characters (a newline would start a line of
    its own) become character references."""
    escaped = html.escape(value, quote=True)
    return "".join(f"&#{ord(c)};" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in escaped)


def file_open(path: str) -> str:
    return f'<file path="{_attribute(path)}">\n'


FILE_CLOSE = "\n</file>\n"
CONTEXT_ROLE: Final = "system"  # the context is one message of this role, before the request's messages
CONTEXT_PREAMBLE = "Answer using the following context.\n\n"


def file_block(path: str, content: str) -> str:
    return file_open(path) + content + FILE_CLOSE


def symbols_block(symbols: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        _attribute(f"{s['name']} ({s.get('kind') or 'symbol'}) {s.get('path') or ''}")
        + (f":{s['line']}" if s.get("line") is not None else "")
        for s in symbols
    ]
    return "<symbols>\n" + "\n".join(lines) + "\n</symbols>\n" if lines else ""
