"""The layer ships bytecode Lambda can use (scripts/layer_bytecode.py; `make build` checks the layer it
builds): compiled by this Python, with unchecked hashes, so a read-only layer whose files' times
changed in the zip still imports without compiling, and each from the very file beside it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

spec = importlib.util.spec_from_file_location("layer_bytecode", ROOT / "scripts" / "layer_bytecode.py")
assert spec is not None and spec.loader is not None
layer_bytecode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layer_bytecode)


def _layer(tmp_path: Path) -> Path:
    root = tmp_path / "python"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "value.py").write_text("X = 1\n")
    return root


def _compile(root: Path, mode: str = "unchecked-hash", *, isolated: bool = True, **env: str) -> None:
    """``compileall`` in its own interpreter, as shared/Makefile runs it (``-E``: the caller's
    ``PYTHON*`` variables ignored) unless ``isolated`` is False; ``env``: variables it is given."""
    flags = ["-E"] if isolated else []
    subprocess.run(
        [sys.executable, *flags, "-m", "compileall", "-q", "--invalidation-mode", mode, str(root)],
        env={**os.environ, **env},
        check=True,
    )


def _imported_value(root: Path) -> str:
    """``pkg.value.X`` as a fresh interpreter that cannot write bytecode (a read-only layer) imports it."""
    code = f"import sys; sys.path.insert(0, {str(root)!r}); import pkg.value; print(pkg.value.X)"
    done = subprocess.run(
        [sys.executable, "-E", "-B", "-c", code],  # -E: as Lambda, no PYTHONPYCACHEPREFIX of the caller's
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_modules_without_bytecode_are_reported(tmp_path: Path) -> None:
    root = _layer(tmp_path)
    assert layer_bytecode.problems(root) == {
        Path("pkg/__init__.py"): "no bytecode",
        Path("pkg/value.py"): "no bytecode",
    }
    assert layer_bytecode.main([str(root)]) == 1


def test_bytecode_checked_against_the_files_is_reported(tmp_path: Path) -> None:
    root = _layer(tmp_path)
    _compile(root, "timestamp")
    assert set(layer_bytecode.problems(root).values()) == {"bytecode checked against the file's time or hash"}


def test_bytecode_of_another_python_is_reported(tmp_path: Path) -> None:
    root = _layer(tmp_path)
    _compile(root)
    cached = layer_bytecode.bytecode_path(root / "pkg" / "value.py")
    cached.write_bytes(b"\x00\x00\r\n" + cached.read_bytes()[4:])
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert layer_bytecode.problems(root) == {Path("pkg/value.py"): f"bytecode of another Python than {this}"}


def test_unchecked_bytecode_passes_and_is_used_whatever_the_files_times(tmp_path: Path) -> None:
    root = _layer(tmp_path)
    _compile(root)
    assert layer_bytecode.problems(root) == {}
    assert layer_bytecode.main([str(root)]) == 0
    # The source changes after the build, its time too (as SAM's zip, which dates every file 1980, does): the
    # interpreter still imports the bytecode, without compiling (it would have read X = 2).
    source = root / "pkg" / "value.py"
    source.write_text("X = 2\n")
    os.utime(source, (1, 1))
    assert _imported_value(root) == "1"


def test_checked_bytecode_is_not_used_once_the_files_times_change(tmp_path: Path) -> None:
    """Why the build does not keep pip's bytecode: checked against the files' times, it is compiled
    again when they differ, on every cold start of a read-only layer."""
    root = _layer(tmp_path)
    _compile(root, "timestamp")
    source = root / "pkg" / "value.py"
    source.write_text("X = 2\n")
    os.utime(source, (1, 1))
    assert _imported_value(root) == "2"


def test_bytecode_of_another_version_of_the_file_is_reported(tmp_path: Path) -> None:
    """Unchecked bytecode runs instead of its file: it must have been built from that very file."""
    root = _layer(tmp_path)
    _compile(root)
    (root / "pkg" / "value.py").write_text("X = 2\n")
    reason = layer_bytecode.problems(root)[Path("pkg/value.py")]
    assert reason.startswith("bytecode of another version of the file")
    assert layer_bytecode.problems(root).keys() == {Path("pkg/value.py")}


def test_bytecode_sent_elsewhere_by_the_callers_environment_is_missing(tmp_path: Path) -> None:
    """A ``PYTHONPYCACHEPREFIX`` or ``PYTHONOPTIMIZE`` in the build's environment moves or renames
    what compileall writes; Lambda looks beside each file, unoptimized. The check looks there too,
    and the build's ``-E`` keeps the bytecode there."""
    for env in ({"PYTHONPYCACHEPREFIX": str(tmp_path / "prefix")}, {"PYTHONOPTIMIZE": "1"}):
        root = _layer(tmp_path / next(iter(env)))
        _compile(root, isolated=False, **env)
        assert set(layer_bytecode.problems(root).values()) == {"no bytecode"}, env
        _compile(root, **env)
        assert layer_bytecode.problems(root) == {}, env


def test_modules_in_a_symlinked_directory_are_checked(tmp_path: Path) -> None:
    """compileall does not enter a symlinked directory, but the zip does: such modules count."""
    root = _layer(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.py").write_text("Y = 1\n")
    (root / "pkg" / "linked").symlink_to(elsewhere, target_is_directory=True)
    _compile(root)
    assert layer_bytecode.problems(root) == {Path("pkg/linked/linked.py"): "no bytecode"}


def test_the_layer_build_compiles_what_the_check_accepts() -> None:
    makefile = (ROOT / "shared" / "Makefile").read_text()
    assert "-E -m compileall" in makefile and "--invalidation-mode unchecked-hash -d /opt/python" in makefile
    build = (ROOT / "Makefile").read_text()
    assert "scripts/layer_bytecode.py .aws-sam/build/SharedLayer/python" in build
