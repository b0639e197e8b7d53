"""HTTP edge shared by every API function: resolver, error envelope, request id, tenant."""

from spool_core.api.resolver import (
    api_handler,
    create_resolver,
    json_response,
    parse_body,
    public_base_url,
    request_id,
    tenant_of,
)

__all__ = [
    "api_handler",
    "create_resolver",
    "json_response",
    "parse_body",
    "public_base_url",
    "request_id",
    "tenant_of",
]
