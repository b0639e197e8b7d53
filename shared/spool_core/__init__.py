"""Spool's own library: the domain logic, its ports and their AWS adapters.

Deployed as the Lambda layer every function imports. Nothing here imports from ``functions/`` or
``worker/``: dependencies point from the handlers into this package, never back.

Importing it freezes what exists so far (``gc.freeze``): the runtime, the standard library and the
libraries a handler imported first (Powertools, pydantic) are module-level objects that live as long
as the process, and the cyclic collector stops walking them. Without it, a function's imports
allocate enough for Python's first full collection to run mid-import and walk every object loaded so
far: 25-30 ms of every cold start, about a tenth of bare boto3 + the REST resolver (see
docs/decisions.md, cold start). A frozen object is never freed; at this point almost nothing is
garbage (5 unreachable objects, about 2 KB, in the jobs function).
"""

import gc

gc.freeze()

__version__ = "0.1.0"
