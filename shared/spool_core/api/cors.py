"""CORS, one definition for every surface: the Lambda resolvers (Powertools' CORSConfig), the
streaming app, and (in template.yaml) API Gateway's preflight and gateway responses.

``SPOOL_CORS_ORIGINS`` is a comma-separated list of allowed origins, ``*`` for any. A response to an
allowed origin names that origin (so a page on another origin can read it), and exposes the headers a
client acts on: the request id, ``Retry-After``, the rate-limit headers and a context's ``ETag``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler.api_gateway import CORSConfig

ORIGINS_ENV = "SPOOL_CORS_ORIGINS"
EXPOSED_HEADERS = (
    "X-Request-Id",
    "Retry-After",
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Tokens",
    "X-Spool-Job-Id",
    "x-should-retry",  # a 429 no retry can fix (OpenAI SDKs read it, in a browser too)
    "ETag",  # a context's version, which a PATCH's If-Match names
)
# Request headers a browser may send beyond the CORS-safelisted ones: Spool's own by name, then any
# other (``*``: the official OpenAI JS SDK sends its own ``x-stainless-*`` headers, and "existing
# clients work by changing only base_url" holds in a browser too). A wildcard never covers
# ``Authorization``, which is named; Spool's answers carry no cookies, so the wildcard applies.
ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-Api-Key",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-Request-Id",
    "*",
)
ALLOWED_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS")
MAX_AGE_SECONDS = 600


def allowed_origins() -> list[str]:
    origins = [o.strip().rstrip("/") for o in os.environ.get(ORIGINS_ENV, "*").split(",")]
    return [o for o in origins if o] or ["*"]


def resolver_config() -> CORSConfig:
    """For Powertools' resolvers: every route's response (errors included) carries the headers.
    (Imported here: the streaming app reads this module and never loads Powertools' resolver.)"""
    from aws_lambda_powertools.event_handler.api_gateway import CORSConfig

    first, *extra = allowed_origins()
    return CORSConfig(
        allow_origin=first,
        extra_origins=extra,
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=MAX_AGE_SECONDS,
    )


__all__ = [
    "ALLOWED_HEADERS",
    "ALLOWED_METHODS",
    "EXPOSED_HEADERS",
    "MAX_AGE_SECONDS",
    "ORIGINS_ENV",
    "allowed_origins",
    "resolver_config",
]
