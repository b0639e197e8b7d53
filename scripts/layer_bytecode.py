"""Check that a built layer ships the bytecode of every module it holds, for the functions' Python.

Lambda unpacks a layer read-only under /opt: Python cannot write a ``__pycache__`` there, so a module
without one is compiled from source in every new execution environment. Without bytecode, importing a
handler took 1.0-1.25 s of CPU, against 0.46-0.52 s with it (docs/decisions.md, "Bytecode in the
layer"). ``shared/Makefile`` compiles the layer with ``--invalidation-mode unchecked-hash``: the
files' times do not survive the zip Lambda unpacks (SAM dates every entry 1980), so bytecode checked
against them would be ignored; unchecked, it is used as built, so each file's bytecode must be built
from that very file (this checks the hash it records).

Usage: python scripts/layer_bytecode.py LAYER_PYTHON_DIR   (exit 1, with the modules, when any lacks it)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

UNCHECKED_HASH = 0b01  # PEP 552 flags: hash-based (bit 0), not checked against the source (bit 1 clear)


def _modules(root: Path) -> Iterator[Path]:
    """Every ``.py`` file under ``root``, through symlinked directories too (the zip follows them)."""
    for folder, _, files in sorted(os.walk(root, followlinks=True)):
        yield from (Path(folder, name) for name in sorted(files) if name.endswith(".py"))


def bytecode_path(source: Path) -> Path:
    """Where Lambda's interpreter looks for ``source``'s bytecode: beside it, for this Python, not
    optimized. Spelled out, not ``importlib.util.cache_from_source``, which follows this interpreter's
    ``PYTHONPYCACHEPREFIX`` and ``-O`` (``compileall`` does too, so both would agree on a wrong place)."""
    return source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"


def problem(source: Path) -> str | None:
    """Why ``source`` would be compiled at import, or run as other code than its text (None: its
    bytecode is there, of this Python, unchecked, and built from this very file)."""
    cached = bytecode_path(source)
    if not cached.is_file():
        return "no bytecode"
    header = cached.read_bytes()[:16]
    if header[:4] != importlib.util.MAGIC_NUMBER:
        return f"bytecode of another Python than {sys.version_info.major}.{sys.version_info.minor}"
    if int.from_bytes(header[4:8], "little") != UNCHECKED_HASH:
        return "bytecode checked against the file's time or hash"
    if header[8:16] != importlib.util.source_hash(source.read_bytes()):
        return "bytecode of another version of the file (unchecked: it would run instead of the file)"
    return None


def problems(root: Path, sources: Iterable[Path] | None = None) -> dict[Path, str]:
    """Every module under ``root`` (or of ``sources``, found there) whose bytecode Lambda could not
    use, and why."""
    found = {}
    for source in _modules(root) if sources is None else sources:
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
    sources = list(_modules(root))
    found = problems(root, sources)
    if found:
        for path, reason in list(found.items())[:20]:
            print(f"{path}: {reason}", file=sys.stderr)
        print(
            f"{len(found)} of {len(sources)} modules in {root} would be compiled at every cold start"
            " (shared/Makefile's build-SharedLayer compiles them)",
            file=sys.stderr,
        )
        return 1
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"{root}: bytecode for all {len(sources)} modules, Python {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
