"""What `make dev` prints for the user to try runs as printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from spool.cli import _spool_command


def test_the_printed_spool_command_runs_from_where_it_is_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv not activated, as under `make dev`
    command = _spool_command()
    assert command != "spool"
    assert os.access(Path(command), os.X_OK)


def test_the_bare_name_when_it_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert _spool_command() == "spool"
