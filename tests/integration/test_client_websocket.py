"""The Python clients' WebSocket streams against a WebSocket endpoint on loopback: a stream of a job
the client has seen connects at once, without reading the job for its ``links.subscribe`` first."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from spool import AsyncClient, Client
from spool.client import NotFound

URL = "http://127.0.0.1:8000"  # the HTTP side is in memory (httpx2.MockTransport)
DONE: dict[str, Any] = {
    "job_id": "job_1",
    "status": "completed",
    "usage": {"input_tokens": 5, "output_tokens": 1, "estimated_tokens": 9},
    "cost_usd": 0.0001,
    "error": None,
    "last_sequence_id": 1,
}


class WebSocketSpool:
    """A WebSocket endpoint on a free local port that answers each subscribe with the job's chunks
    and ``done``, and the HTTP side (``links.subscribe`` naming it); both log what they were sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []  # HTTP requests and subscribe frames, in the order they came
        self.quiet = 0  # the next subscribes answered with nothing at all (a job still queued)
        self._server = ws_serve(self._serve, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self.link = self.url  # what its jobs' links.subscribe name
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _serve(self, socket: ServerConnection) -> None:
        for frame in socket:
            request = json.loads(frame)
            self.sent.append(f"subscribe {request['job_id']}")
            if self.quiet:
                self.quiet -= 1
                continue
            if request["job_id"] != "job_1":
                socket.send(
                    json.dumps({"type": "error", "error": {"code": "job_not_found", "message": "no"}})
                )
                continue
            socket.send(json.dumps({"type": "chunk", "job_id": "job_1", "sequence_id": 1, "text": "x"}))
            socket.send(json.dumps({"type": "done", **DONE}))

    def http(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(f"{request.method} {request.url.path}")
        job = {"job_id": "job_1", "status": "queued", "links": {"subscribe": self.link}}
        if request.url.path == "/v1/jobs/job_2":
            return httpx2.Response(404, json={"error": {"code": "job_not_found", "message": "no"}})
        return httpx2.Response(202 if request.method == "POST" else 200, json=job)

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def websocket_spool() -> Iterator[WebSocketSpool]:
    spool = WebSocketSpool()
    yield spool
    spool.close()


def test_a_websocket_stream_of_a_created_job_connects_without_reading_the_job_first(
    websocket_spool: WebSocketSpool,
) -> None:
    client = Client(URL, "sk-test", http_transport=httpx2.MockTransport(websocket_spool.http))
    job = client.create_job("hi")
    assert list(client.stream(job["job_id"], transport="websocket")) == ["x"]
    assert websocket_spool.sent == ["POST /v1/jobs", "subscribe job_1"]
    with pytest.raises(NotFound):  # a job it does not know: the endpoint's error, as a typed error
        list(client.stream("job_2", transport="websocket"))
    fresh = Client(
        URL, "sk-test", http_transport=httpx2.MockTransport(websocket_spool.http)
    )  # knows no job yet
    assert list(fresh.stream("job_1", transport="websocket")) == ["x"]
    assert websocket_spool.sent[-2:] == ["GET /v1/jobs/job_1", "subscribe job_1"]


def test_the_async_websocket_stream_uses_the_link_it_already_has(websocket_spool: WebSocketSpool) -> None:
    async def main() -> list[str]:
        async with AsyncClient(
            URL, "sk-test", http_transport=httpx2.MockTransport(websocket_spool.http)
        ) as spool:
            job = await spool.create_job("hi")
            return [text async for text in spool.stream(job["job_id"], transport="websocket")]

    assert asyncio.run(main()) == ["x"]
    assert websocket_spool.sent == ["POST /v1/jobs", "subscribe job_1"]


def test_a_remembered_link_that_is_gone_is_read_again_from_the_job(websocket_spool: WebSocketSpool) -> None:
    """The stack restarted with its WebSocket endpoint on another port: the stream reads the job's link
    once more and goes on; the client then remembers the new link."""
    gone = WebSocketSpool()
    client = Client(URL, "sk-test", http_transport=httpx2.MockTransport(gone.http))
    client.create_job("hi")  # remembers the first endpoint
    gone.close()
    gone.link = websocket_spool.url  # the deployment's answers now name the other one
    assert list(client.stream("job_1", transport="websocket")) == ["x"]
    assert gone.sent == ["POST /v1/jobs", "GET /v1/jobs/job_1"]
    assert websocket_spool.sent == ["subscribe job_1"]
    assert client.subscribe_url == websocket_spool.url


def test_the_async_client_reads_a_gone_link_again(websocket_spool: WebSocketSpool) -> None:
    gone = WebSocketSpool()

    async def main() -> list[str]:
        async with AsyncClient(URL, "sk-test", http_transport=httpx2.MockTransport(gone.http)) as spool:
            await spool.create_job("hi")
            gone.close()
            gone.link = websocket_spool.url
            return [text async for text in spool.stream("job_1", transport="websocket")]

    assert asyncio.run(main()) == ["x"]
    assert gone.sent == ["POST /v1/jobs", "GET /v1/jobs/job_1"]
    assert websocket_spool.sent == ["subscribe job_1"]


def test_a_quiet_subscription_is_asked_again_and_never_counted_as_a_failure(
    websocket_spool: WebSocketSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job queued for minutes sends nothing: the client gave up after three quiet periods with
    ``ConnectionFailed ... timed out``, where SSE and long-polling waited on. Quiet is not broken."""
    from spool import _core

    monkeypatch.setattr(_core, "QUIET_SECONDS", 0.0)
    websocket_spool.quiet = 4
    client = Client(
        URL, "sk-test", timeout=0.2, max_retries=0, http_transport=httpx2.MockTransport(websocket_spool.http)
    )
    job = client.create_job("hi")
    assert list(client.stream(job["job_id"], transport="websocket")) == ["x"]
    assert websocket_spool.sent.count("subscribe job_1") == 5

    async def stream() -> list[str]:
        async with AsyncClient(
            URL,
            "sk-test",
            timeout=0.2,
            max_retries=0,
            http_transport=httpx2.MockTransport(websocket_spool.http),
        ) as aclient:
            created = await aclient.create_job("hi")
            return [text async for text in aclient.stream(created["job_id"], transport="websocket")]

    websocket_spool.quiet = 3
    assert asyncio.run(stream()) == ["x"]
