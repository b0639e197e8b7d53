"""How a context is laid out in the prompt: each file with its path, then the symbols.

The worker renders prompts with these functions and the token counter counts with them, so the
count a client sees before a job is the count of what the model is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def file_open(path: str) -> str:
    return f'<file path="{path}">\n'


FILE_CLOSE = "\n</file>\n"


def file_block(path: str, content: str) -> str:
    return file_open(path) + content + FILE_CLOSE


def symbols_block(symbols: Iterable[Mapping[str, Any]]) -> str:
    lines = [
        f"{s['name']} ({s.get('kind') or 'symbol'}) {s.get('path') or ''}"
        + (f":{s['line']}" if s.get("line") is not None else "")
        for s in symbols
    ]
    return "<symbols>\n" + "\n".join(lines) + "\n</symbols>\n" if lines else ""
