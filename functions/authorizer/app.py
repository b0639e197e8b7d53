"""REQUEST authorizer: API key -> tenant. The tenant travels to the API functions in the policy context."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.data_classes import event_source
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerRequestEvent,
    APIGatewayAuthorizerResponse,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from spool_core import bootstrap
from spool_core.auth import extract_api_key
from spool_core.observability import logger

ANONYMOUS = "anonymous"


@logger.inject_lambda_context(clear_state=True)
@event_source(data_class=APIGatewayAuthorizerRequestEvent)
def lambda_handler(event: APIGatewayAuthorizerRequestEvent, context: LambdaContext) -> dict[str, Any]:
    arn = event.parsed_arn
    record = bootstrap.api_keys().authenticate(extract_api_key(event.headers))
    policy = APIGatewayAuthorizerResponse(
        principal_id=record.key_id if record else ANONYMOUS,
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
    )
    if record is None:
        logger.info("request denied: missing or unknown API key", extra={"path": event.path})
        policy.deny_all_routes()
    else:
        policy.context = {"tenant_id": record.tenant_id, "key_id": record.key_id}
        policy.allow_all_routes()
    return policy.asdict()
