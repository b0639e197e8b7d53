"""Put on the embedded stack's ``PYTHONPATH`` by ``make bench``'s cost suite (``bench/cost.py``): the
fork server imports it at start, so every container forked from it meters DynamoDB request units
(``bench/capacity.py``). Does nothing unless ``SPOOL_BENCH_CAPACITY`` is set."""

import importlib.util
import os
import sys
from pathlib import Path

if os.environ.get("SPOOL_BENCH_CAPACITY"):
    _path = Path(__file__).resolve().parents[1] / "capacity.py"
    _spec = importlib.util.spec_from_file_location("_spool_bench_capacity", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = _module
        _spec.loader.exec_module(_module)
        _module.install_from_environment()
