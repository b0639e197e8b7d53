"""REQUEST authorizer: API key -> tenant, or a ``links.events`` token -> one job's event stream.

The tenant travels to the API functions in the policy context. An API key opens every route; an
events token (``?token=`` on ``GET /v1/jobs/{id}/events``, what a browser's EventSource can send)
opens that one stream of that one job, read-only, until it expires or the key it was handed to is
revoked.

Keys are looked up through a cache kept for the life of the execution environment
(``SPOOL_AUTH_CACHE_SECONDS``, see ``spool_core.auth.KeyCache``): a revoked or expired key is refused
once its entry ends. Both kinds of credential return the tenant's ``usageIdentifierKey``
(``spool_core.auth.usage_key``), which the API's usage plan meters and throttles by.
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.utilities.data_classes import event_source
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerRequestEvent,
    APIGatewayAuthorizerResponse,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from spool_core import bootstrap
from spool_core.adapters import api_keys  # noqa: F401 - the key lookup at init: every call uses it
from spool_core.auth import extract_api_key, usage_key
from spool_core.observability import logger

ANONYMOUS = "anonymous"
EVENTS_TOKEN_PARAMETER = "token"  # noqa: S105 - the name of a query parameter


@logger.inject_lambda_context(clear_state=True)
@event_source(data_class=APIGatewayAuthorizerRequestEvent)
def lambda_handler(event: APIGatewayAuthorizerRequestEvent, context: LambdaContext) -> dict[str, Any]:
    arn = event.parsed_arn
    policy = APIGatewayAuthorizerResponse(
        principal_id=ANONYMOUS,
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
    )
    presented = extract_api_key(event.headers)
    token = (event.query_string_parameters or {}).get(EVENTS_TOKEN_PARAMETER)
    if presented is None and token:
        return _events_token(policy, token, event.path).asdict()
    record = bootstrap.api_keys().authenticate(presented)
    if record is None:
        logger.info(
            "request denied: missing, unknown, revoked or expired API key", extra={"path": event.path}
        )
        # API Gateway answers its UNAUTHORIZED response (401, how to send a key) to this exact error.
        raise Exception("Unauthorized")
    policy.principal_id = record.key_id
    policy.usage_identifier_key = usage_key(record.tenant_id)
    # The key's hash: what a stream asks about as it goes (the key that was checked here, whichever
    # of several key headers a function would read).
    policy.context = {
        "tenant_id": record.tenant_id,
        "key_id": record.key_id,
        "key_hash": record.key_hash,
        "scope": "*",
    }
    policy.allow_all_routes()
    return policy.asdict()


def _events_token(
    policy: APIGatewayAuthorizerResponse, token: str, path: str
) -> APIGatewayAuthorizerResponse:
    """Allow exactly ``GET /v1/jobs/<job>/events`` for the job the token was signed for."""
    signer = bootstrap.events_token()
    claims = signer.verify(token, time.time()) if signer is not None else None
    if claims is None:  # a deny: API Gateway's ACCESS_DENIED response says what is wrong with a token
        logger.info("request denied: events token invalid or expired", extra={"path": path})
        policy.deny_all_routes()
        return policy
    tenant_id, job_id, key_id = claims
    context = {"tenant_id": tenant_id, "scope": f"events:{job_id}"}
    if key_id is not None:  # the key it was handed to must still be active, and the stream asks as it goes
        record = bootstrap.api_keys().check_id(key_id, tenant_id)
        if record is None:
            logger.info("request denied: the events token's key was revoked or expired", extra={"path": path})
            policy.deny_all_routes()
            return policy
        context["key_hash"] = record.key_hash
    policy.principal_id = f"events:{job_id}"
    policy.usage_identifier_key = usage_key(tenant_id)  # a stream counts against its tenant's plan
    policy.context = context
    policy.allow_route("GET", f"/v1/jobs/{job_id}/events")
    return policy
