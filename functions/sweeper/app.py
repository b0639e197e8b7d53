"""The sweeper, every minute: re-queue the jobs nobody is working on and no message will bring back
(an admission that died before sending its message, a lost message), and have a job's end delivered
again to a subscriber whose subscribe handler died holding it (``spool_core.due_ends``)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from spool_core import bootstrap
from spool_core.observability import logger


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        redelivered = bootstrap.due_end_sweeper().sweep()
    finally:  # one sweep failing (a table throttled, say) does not stop the other
        requeued = bootstrap.sweeper().sweep()
    return {"requeued": requeued, "ends_redelivered": redelivered}
