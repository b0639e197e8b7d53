"""A web app run the way Lambda Web Adapter runs one (tests of the local runtime's web containers)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

if os.environ.get("PROBE_INIT_FAILS"):
    raise RuntimeError("the web app failed to start")


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def whoami(request: Request) -> Response:
    return JSONResponse(
        {
            "pid": os.getpid(),
            "context": request.headers.get("x-amzn-request-context"),
            "lambda": request.headers.get("x-amzn-lambda-context"),
            "variable": os.environ.get("PROBE"),
        }
    )


async def stream(request: Request) -> Response:
    """``n`` lines, ``delay`` seconds apart; ``crash_at``: the process dies before that line."""
    count = int(request.query_params.get("n", "3"))
    delay = float(request.query_params.get("delay", "0"))
    crash_at = int(request.query_params.get("crash_at", "-1"))

    async def lines() -> AsyncIterator[str]:
        for i in range(count):
            if i == crash_at:
                os._exit(3)
            yield f"line {i}\n"
            await asyncio.sleep(delay)

    return StreamingResponse(lines(), media_type="text/plain")


app = Starlette(routes=[Route("/healthz", healthz), Route("/whoami", whoami), Route("/stream", stream)])
