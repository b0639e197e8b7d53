"""How a context is laid out in the prompt: one system message, a preamble, each file with its path,
then the symbols.

The worker renders prompts with these functions and the token counter counts with them, so the
count a client sees before a job is the count of what the model is sent, each file's tokens counted
on their own: about a token a file above the joined text (a file's last newline and the closing tag's
first are one token when joined; rare endings move it a token or two either way). Admission counts the
joined text when that difference could put a request over its model's window
(``ContextService.exact_prompt_tokens``).
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


def context_text(files: Iterable[tuple[str, str]], symbols: Iterable[Mapping[str, Any]]) -> str:
    """The context's message: the preamble, each (path, content) with its path, then the symbols."""
    return (
        CONTEXT_PREAMBLE
        + "".join(file_block(path, content) for path, content in files)
        + symbols_block(symbols)
    )


def symbols_block(symbols: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        _attribute(f"{s['name']} ({s.get('kind') or 'symbol'}) {s.get('path') or ''}")
        + (f":{s['line']}" if s.get("line") is not None else "")
        for s in symbols
    ]
    return "<symbols>\n" + "\n".join(lines) + "\n</symbols>\n" if lines else ""
