"""A function for the local runtime's tests: it reports its process and module state, and can sleep,
raise or die on request."""

import os
import time
from typing import Any

INVOCATIONS = 0  # module state: per container, as on Lambda
IMPORTED_BY = os.getpid()  # the process that ran the init (the function's fork server)
IMPORTED_WITH = os.environ.get("PROBE")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global INVOCATIONS
    INVOCATIONS += 1
    time.sleep(event.get("sleep", 0))
    if event.get("raise"):
        raise ValueError(event["raise"])
    if event.get("exit"):
        os._exit(137)
    return {
        "pid": os.getpid(),
        "invocations": INVOCATIONS,
        "variable": os.environ.get(event.get("variable", "PROBE"), None),
        "remaining_ms": context.get_remaining_time_in_millis(),
        "request_id": context.aws_request_id,
        "imported_by": IMPORTED_BY,
        "imported_with": IMPORTED_WITH,
    }
