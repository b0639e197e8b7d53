from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT

# Handlers read these from template.yaml's Globals when deployed; tests that run them in-process
# without the stack need the same Powertools settings.
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "spool")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "Spool")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / ".cache" / "tiktoken"))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT
