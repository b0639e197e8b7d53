"""Spool's own library: the domain logic, its ports and their AWS adapters.

Deployed as the Lambda layer every function imports. Nothing here imports from ``functions/`` or
``worker/``: dependencies point from the handlers into this package, never back.

The cyclic garbage collector and a function's cold start: what a handler's import loads (boto3,
Powertools, pydantic, Spool's modules and classes) lives as long as the process, yet the collector
walks it again and again while it loads: ~130 collections, ~20 ms of the jobs function's import. So
in a Lambda execution environment, importing this package turns the collector off; every handler
module imports it first and ends with ``initialized()``, which moves everything loaded into the
permanent generation (``gc.freeze``: never walked again, never freed) and turns the collector back on
for the garbage requests make. The price: what the import left as garbage is frozen too, never freed
(~450 objects, ~0.3 MB, in the jobs function and the worker), a fixed cost per execution environment;
collecting it first would cost ~45 ms of the cold start. Elsewhere (the CLI, the tests, the local
tools) the collector stays on, what exists at this import is frozen, and ``initialized()`` does
nothing. ``tests/unit/test_cold_imports.py`` imports every function of the template and checks that
none collects while it loads and each leaves the collector on.
"""

import gc
import os

__version__ = "0.1.0"

_loading = bool(os.environ.get("LAMBDA_TASK_ROOT"))  # a Lambda function's init: no collection until done
if _loading:
    gc.disable()
else:
    gc.freeze()


def initialized() -> None:
    """The last line of a handler module: in a Lambda environment, freeze what the function loaded
    and collect garbage from now on."""
    global _loading
    if _loading:
        _loading = False
        gc.freeze()
        gc.enable()
