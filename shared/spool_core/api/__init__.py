"""HTTP edge: the REST functions' resolver (``spool_core.api.resolver``), the streaming function's
web app edge (``spool_core.api.web``), the one error-to-HTTP map (``spool_core.api.errors``) and CORS.

Nothing is imported here: the WebSocket function reads the error map and the streaming function its
web edge, and neither should load Powertools' REST resolver with them (~50 ms at a cold start).
"""
