"""/v1/contexts: upload context once, reference it by id, update it by sending only what changed."""

from __future__ import annotations

from spool_core.api import api_handler, create_resolver

app = create_resolver()

lambda_handler = api_handler(app)
