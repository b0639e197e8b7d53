"""``AsyncClient``: the Spool client for asyncio, on one keep-alive ``httpx2.AsyncClient``. The same
surface as ``Client`` (every method a coroutine; ``stream()`` an async iterator), the same retries,
errors and sync plan: everything but the I/O is ``spool._core``'s, shared with ``Client``.

    async with AsyncClient() as client:
        job = await client.create_job("Explain the worker", model="sim-fast")
        async for text in client.stream(job["job_id"]):
            print(text, end="")
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from spool import _core
from spool._core import Call, ClientBase, Steps, StreamState, T
from spool.errors import ConnectionFailed, SpoolError
from spool.sync import Progress, load_manifest, manifest_for, snapshot

ProgressCallback = Callable[[dict[str, Any]], None]


class AsyncJobStream(StreamState):
    """``JobStream`` for asyncio: ``async for text in stream``; the same attributes and errors."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        after: int,
        transport: str,
        on_progress: ProgressCallback | None,
    ) -> None:
        super().__init__(job_id, after, on_progress)
        self.transport = transport
        self._texts = client._texts(self, transport)

    def __aiter__(self) -> AsyncJobStream:
        return self

    async def __anext__(self) -> str:
        return await anext(self._texts)

    async def close(self) -> None:
        """Stop reading (closes the connection)."""
        await self._texts.aclose()

    aclose = close


class AsyncClient(ClientBase):
    """``Client`` on asyncio; see ``spool.client.Client`` for what each method does."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 2,
        max_retry_wait: float = 8.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        http_transport: httpx2.AsyncBaseTransport | None = None,
        direct_upload_limit: int | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait, direct_upload_limit)
        self._sleep = sleep
        self._http = httpx2.AsyncClient(transport=http_transport, **self.settings.http_options())

    # ------------------------------------------------------------------ transport
    async def _exchange(self, call: Call) -> tuple[httpx2.Response, Any]:
        attempt = 0
        while True:
            try:
                response = await self._send(call)
                return response, _core.answer(call, response)
            except _core.RETRYABLE as error:
                attempt = await self._wait_or_raise(attempt, error)

    async def _send(self, call: Call) -> httpx2.Response:
        content = _async_chunks(call) if call.progress is not None else call.body
        request = self._http.build_request(content=content, **call.request_args(self.settings))
        try:
            return await self._http.send(request)
        except httpx2.TransportError as exc:
            raise _core.unreachable(self.settings, call, exc) from exc

    async def _wait_or_raise(self, attempt: int, error: SpoolError) -> int:
        delay = self.retry.delay(attempt, error)
        if delay is None:
            raise error.after(attempt + 1) if isinstance(error, ConnectionFailed) else error
        await self._sleep(delay)
        return attempt + 1

    async def _call(self, call: Call) -> Any:
        return self.seen((await self._exchange(call))[1])

    async def _drive(self, steps: Steps[T]) -> T:
        """Run shared steps (``spool._core``): send each call, hand back its answer or its error."""
        driver = _core.Driver(steps)
        while (call := driver.next()) is not None:
            try:
                driver.answer(await self._call(call))
            except SpoolError as error:
                driver.fail(error)
        return driver.result

    async def request(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        response, answer = await self._exchange(Call(method, path, json=body, headers=headers))
        return response.status_code, dict(response.headers), answer

    # ------------------------------------------------------------------ contexts
    async def create_context(self, files: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        return await self._call(Call("POST", "/v1/contexts", json={"files": files, **fields}))  # type: ignore[no-any-return]

    async def get_context(self, context_id: str) -> dict[str, Any]:
        return await self._call(Call("GET", f"/v1/contexts/{_core.segment(context_id)}"))  # type: ignore[no-any-return]

    async def patch_context(self, context_id: str, **changes: Any) -> dict[str, Any]:
        return await self._call(Call("PATCH", f"/v1/contexts/{_core.segment(context_id)}", json=changes))  # type: ignore[no-any-return]

    async def delete_context(self, context_id: str) -> None:
        await self._call(Call("DELETE", f"/v1/contexts/{_core.segment(context_id)}"))

    async def list_contexts(self, *, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        return await self._call(_core.list_call("contexts", limit, cursor))  # type: ignore[no-any-return]

    def iter_contexts(self, *, page_size: int = 50) -> AsyncIterator[dict[str, Any]]:
        return self._pages(lambda cursor: _core.list_call("contexts", page_size, cursor))

    async def sync_directory(
        self, directory: str | Path, *, ttl_seconds: int = 3600, progress: Progress | None = None
    ) -> dict[str, Any]:
        """``Client.sync_directory``; the directory is read in a worker thread."""
        snap = await asyncio.to_thread(snapshot, directory, progress=progress)
        path = manifest_for(snap.root, self.base_url, self.api_key)
        steps = _core.sync_steps(snap, load_manifest(path), path, self.settings, ttl_seconds, progress)
        return await self._drive(steps)

    # ------------------------------------------------------------------ jobs
    async def create_job(
        self,
        message: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        body = _core.job_body(message, messages, fields)
        return await self._drive(_core.create_job_steps(body, idempotency_key))

    async def job(self, job_id: str, *, output: bool = True) -> dict[str, Any]:
        return await self._call(_core.job_call(job_id, output=output))  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._call(Call("POST", f"/v1/jobs/{_core.segment(job_id)}/cancel"))  # type: ignore[no-any-return]

    async def list_jobs(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self._call(_core.list_call("jobs", limit, cursor, status))  # type: ignore[no-any-return]

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> AsyncIterator[dict[str, Any]]:
        return self._pages(lambda cursor: _core.list_call("jobs", page_size, cursor, status))

    async def _pages(self, page: Callable[[str | None], Call]) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            answer = await self._call(page(cursor))
            for item in answer["data"]:
                yield item
            if not (cursor := answer.get("next_cursor")):
                return

    async def models(self) -> dict[str, Any]:
        return await self._call(Call("GET", "/v1/models"))  # type: ignore[no-any-return]

    async def usage(self, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        return await self._call(_core.usage_call(since, until))  # type: ignore[no-any-return]

    async def health(self, deep: bool = False) -> dict[str, Any]:
        return await self._call(_core.health_call(deep))  # type: ignore[no-any-return]

    async def chunks(self, job_id: str, after: int = 0, *, limit: int = 500, wait: int = 0) -> dict[str, Any]:
        call = _core.chunks_call(job_id, after, limit, wait, self.timeout)
        return await self._call(call)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ streams
    def stream(
        self,
        job_id: str,
        after: int = 0,
        *,
        transport: str = "sse",
        on_progress: ProgressCallback | None = None,
    ) -> AsyncJobStream:
        _core.check_transport(transport)
        return AsyncJobStream(self, job_id, after, transport, on_progress)

    async def _texts(self, state: StreamState, transport: str) -> AsyncGenerator[str]:
        if transport == "websocket":
            chunks = self._websocket(state)
        else:
            chunks = self._poll(state) if transport == "poll" else self._events(state)
        async for chunk in chunks:
            yield chunk["text"]
        summary = state.summary_call()
        state.finish(await self._call(summary) if summary is not None else None)

    async def _events(self, state: StreamState) -> AsyncIterator[dict[str, Any]]:
        failures = 0
        while not state.ended:
            headers = self.settings.events_headers(state.last_sequence_id)
            opened = self._http.stream(
                "GET", state.events_path(), headers=headers, timeout=self.settings.stream_timeout()
            )
            try:
                async with opened as response:
                    body = await response.aread() if response.status_code >= 400 else b""
                    _core.raise_for_stream(response, body)
                    async for event in httpx2.EventSource(response):
                        failures = 0
                        if (chunk := state.on_sse(event)) is not None:
                            yield chunk
            except httpx2.TransportError as exc:
                failures = await self._wait_or_raise(failures, _core.broken(self.base_url, exc))
            except _core.RETRYABLE as error:
                failures = await self._wait_or_raise(failures, error)

    async def _websocket(self, state: StreamState) -> AsyncIterator[dict[str, Any]]:
        """``Client._websocket``: the link it remembers, else (or when that is gone) the job's."""
        url, remembered = self.subscribe_url, True
        if not url:
            url, remembered = await self._subscribe_link(state.job_id), False
        failures = 0
        while not state.ended:
            try:
                async with ws_connect(self.settings.websocket_url(url), open_timeout=10) as socket:
                    remembered = False  # it answers: keep it
                    await socket.send(state.subscribe_message())
                    while not state.ended:
                        try:
                            raw = await asyncio.wait_for(socket.recv(), self.timeout + _core.QUIET_SECONDS)
                        except TimeoutError:
                            break  # quiet, not broken: subscribe again, and count no failure
                        failures = 0
                        if (chunk := state.on_websocket(json.loads(raw))) is not None:
                            yield chunk
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
                failure = _core.websocket_failed(url, exc)
                if _core.link_gone(remembered, failure):
                    url, remembered = await self._subscribe_link(state.job_id), False
                    continue
                failures = await self._wait_or_raise(failures, failure)

    async def _subscribe_link(self, job_id: str) -> str:
        """The job's link, read again: its answer is ``seen``, which remembers the link."""
        self.subscribe_url = None
        await self.job(job_id, output=False)
        return self.remembered_link()

    async def _poll(self, state: StreamState) -> AsyncIterator[dict[str, Any]]:
        while not state.ended:
            for chunk in state.on_page(await self._call(state.page_call(self.timeout))):
                yield chunk

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _async_chunks(call: Call) -> AsyncIterator[bytes]:
    for piece in call.chunks():
        yield piece


__all__ = ["AsyncClient", "AsyncJobStream"]
