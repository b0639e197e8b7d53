"""Check that a built layer ships the bytecode of every module it holds, for the functions' Python.

Lambda unpacks a layer read-only under /opt: Python cannot write a ``__pycache__`` there, so a module
without one is compiled from source in every new execution environment. Without bytecode, importing a
handler took 1.0-1.25 s of CPU, against 0.46-0.52 s with it (docs/decisions.md, "Bytecode in the
layer"). ``shared/Makefile`` compiles the layer with ``--invalidation-mode unchecked-hash``: the
files' times do not survive the zip Lambda unpacks (2-second resolution), so bytecode checked against
them would be ignored; unchecked, it is used as built, and it is built from the files beside it.

Usage: python scripts/layer_bytecode.py LAYER_PYTHON_DIR   (exit 1, with the modules, when any lacks it)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

UNCHECKED_HASH = 0b01  # PEP 552 flags: hash-based (bit 0), not checked against the source (bit 1 clear)


def _modules(root: Path) -> Iterator[Path]:
    yield from sorted(root.rglob("*.py"))


def problem(source: Path) -> str | None:
    """Why ``source`` would be compiled at import (None: its bytecode is there, of this Python, unchecked)."""
    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.is_file():
        return "no bytecode"
    header = cached.read_bytes()[:8]
    if header[:4] != importlib.util.MAGIC_NUMBER:
        return f"bytecode of another Python than {sys.version_info.major}.{sys.version_info.minor}"
    if int.from_bytes(header[4:8], "little") != UNCHECKED_HASH:
        return "bytecode checked against the file's time or hash"
    return None


def problems(root: Path) -> dict[Path, str]:
    """Every module under ``root`` whose bytecode Lambda could not use, and why."""
    found = {}
    for source in _modules(root):
        reason = problem(source)
        if reason is not None:
            found[source.relative_to(root)] = reason
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not root.is_dir():
        print(f"{root}: no such directory (run `make build` first)", file=sys.stderr)
        return 2
    found = problems(root)
    total = sum(1 for _ in _modules(root))
    if found:
        for path, reason in list(found.items())[:20]:
            print(f"{path}: {reason}", file=sys.stderr)
        print(
            f"{len(found)} of {total} modules in {root} would be compiled at every cold start"
            " (shared/Makefile compiles them: python -m compileall --invalidation-mode unchecked-hash)",
            file=sys.stderr,
        )
        return 1
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"{root}: bytecode for all {total} modules, Python {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
