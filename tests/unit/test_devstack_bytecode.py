"""The local stack writes the bytecode of the code its functions run before it imports any of it, as
the layer `sam build` makes carries its own: with ``PYTHONDONTWRITEBYTECODE`` set (many containers and
CI images set it), every function fork server and every new container compiled Spool's modules from
source."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from spool.devstack.stack import code_directories, compile_code
from spool.devstack.template import Template
from tests.support import ROOT

TEMPLATE = """\
Transform: AWS::Serverless-2016-10-31
Resources:
  Layer:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: lib/
  Function:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: fn/
      Handler: app.handler
      Runtime: python3.12
"""


def test_the_stack_compiles_every_layer_and_function_of_the_template() -> None:
    template = Template.load(ROOT / "template.yaml")
    found = {Path(os.path.abspath(d)) for d in code_directories(template)}
    assert ROOT / "shared" in found
    for spec in template.functions().values():
        assert Path(os.path.abspath(template.root / spec.code_uri)) in found
    assert ROOT / "spool" in found  # its fork server imports the runtime


def _project(tmp_path: Path) -> Template:
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    (tmp_path / "lib" / "pkg").mkdir(parents=True)
    (tmp_path / "lib" / "pkg" / "__init__.py").write_text("")
    (tmp_path / "lib" / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "app.py").write_text("from pkg.mod import VALUE\n")
    return Template.load(tmp_path / "template.yaml")


def _code(template: Template, tmp_path: Path) -> list[Path]:
    """The template's code directories, without the runtime's own (in this checkout)."""
    return [d for d in code_directories(template) if Path(d).is_relative_to(tmp_path)]


def _valid_bytecode(source: Path) -> bool:
    """Whether the interpreter would load ``source``'s bytecode instead of compiling it: this Python's,
    checked against the source's time and size, which it records (PEP 552's header)."""
    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.exists():
        return False
    header, stat = cached.read_bytes()[:16], source.stat()
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == 0  # checked by time and size
        and int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF
    )


def test_it_writes_what_is_missing_even_where_python_would_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = _project(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE=1
    sources = [tmp_path / "lib" / "pkg" / "__init__.py", tmp_path / "lib" / "pkg" / "mod.py"]
    sources.append(tmp_path / "fn" / "app.py")
    assert not any(_valid_bytecode(source) for source in sources)
    compile_code(_code(template, tmp_path))
    assert all(_valid_bytecode(source) for source in sources)


def test_a_directory_it_may_not_write_is_left_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python compiles a file before it finds it cannot write it: such a directory would be compiled
    in full at every start for nothing. (Asked of ``os.access``, which root's permissions bypass.)"""
    template = _project(tmp_path)
    read_only = tmp_path / "lib"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    compile_code(_code(template, tmp_path))
    assert not _valid_bytecode(read_only / "pkg" / "mod.py")
    assert _valid_bytecode(tmp_path / "fn" / "app.py")


def test_it_writes_bytecode_checked_by_time_even_with_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``SOURCE_DATE_EPOCH`` set, compileall writes hashed bytecode by default and rewrites it at
    every start, never counting it as up to date."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    template = _project(tmp_path)
    compile_code(_code(template, tmp_path))
    assert _valid_bytecode(tmp_path / "lib" / "pkg" / "mod.py")


def test_a_changed_module_is_compiled_again(tmp_path: Path) -> None:
    template = _project(tmp_path)
    compile_code(_code(template, tmp_path))
    module = tmp_path / "lib" / "pkg" / "mod.py"
    module.write_text("VALUE = 22\n")
    os.utime(module, (module.stat().st_atime, module.stat().st_mtime + 5))
    assert not _valid_bytecode(module)
    compile_code(_code(template, tmp_path))
    assert _valid_bytecode(module)
