"""Spool's own library: the domain logic, its ports and their AWS adapters.

Deployed as the Lambda layer every function imports. Nothing here imports from ``functions/`` or
``worker/``: dependencies point from the handlers into this package, never back.
"""

__version__ = "0.1.0"
