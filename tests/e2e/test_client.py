"""The Python clients against the embedded stack: a completed, a failed and a cancelled job each end
``stream()`` distinctly over every transport; a 20 MB directory goes through the presigned upload;
an unchanged directory makes no new version; ``AsyncClient`` does the same under ``asyncio.run``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spool import AsyncClient, Client, JobCancelled, JobFailed
from spool.aio import AsyncJobStream
from tests.e2e.conftest import DEV_KEY, RunningStack, start_stack, stop_stack

TRANSPORTS = ["sse", "websocket", "poll"]
FATAL = {"simulate": {"fault": "fatal", "at_token": 30}}


@pytest.fixture
def client(dev_stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setenv("SPOOL_CACHE_DIR", str(tmp_path / "cache"))
    with Client(dev_stack.base_url, DEV_KEY) as spool:
        yield spool


def assert_summary(result: dict[str, Any] | None, status: str) -> None:
    assert result is not None
    assert result["status"] == status
    assert set(result["usage"]) >= {"input_tokens", "output_tokens", "estimated_tokens"}
    assert isinstance(result["cost_usd"], int | float)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_completed_job_ends_the_stream_with_usage_and_cost(client: Client, transport: str) -> None:
    job = client.create_job("complete", model="sim-fast", max_tokens=40)
    progress: list[dict[str, Any]] = []
    stream = client.stream(job["job_id"], transport=transport, on_progress=progress.append)
    text = "".join(stream)
    assert text == client.job(job["job_id"])["output"]
    assert_summary(stream.result, "completed")
    assert stream.result is not None and stream.result["error"] is None
    assert stream.result["usage"]["output_tokens"] == 40 == stream.tokens
    assert progress[-1]["sequence_id"] == stream.last_sequence_id == progress[-1]["chunks"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_failed_job_raises_job_failed_after_every_chunk_written(client: Client, transport: str) -> None:
    job = client.create_job("fail", model="sim-fast", max_tokens=200, metadata=FATAL)
    received: list[str] = []
    stream = client.stream(job["job_id"], transport=transport)
    with pytest.raises(JobFailed) as raised:
        received.extend(stream)
    failure = raised.value
    final = client.job(job["job_id"])
    assert "".join(received) == final["output"]  # every chunk written was yielded
    assert (failure.job_id, failure.status, failure.code) == (job["job_id"], "failed", "provider_error")
    assert (
        failure.last_sequence_id == final["error"]["details"]["last_sequence_id"] == stream.last_sequence_id
    )
    assert failure.usage is not None and failure.usage["output_tokens"] == 30
    assert failure.cost_usd == final["cost_usd"]
    assert_summary(stream.result, "failed")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_cancelled_job_raises_job_cancelled(
    client: Client, dev_stack: RunningStack, transport: str
) -> None:
    job = client.create_job("cancel me", model="sim-realtime", max_tokens=3000)
    stream = client.stream(job["job_id"], transport=transport)
    received = [next(stream)]  # the job is running: cancel it from elsewhere
    with Client(dev_stack.base_url, DEV_KEY) as other:
        other.cancel(job["job_id"])
    with pytest.raises(JobCancelled) as raised:
        received.extend(stream)
    final = client.job(job["job_id"])
    assert final["status"] == "cancelled"
    assert "".join(received) == final["output"]
    assert (raised.value.code, raised.value.status) == ("job_cancelled", "cancelled")
    assert raised.value.last_sequence_id == stream.last_sequence_id
    assert_summary(stream.result, "cancelled")


def test_close_stops_reading(client: Client) -> None:
    job = client.create_job("close", model="sim-realtime", max_tokens=3000)
    stream = client.stream(job["job_id"])
    next(stream)
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    client.cancel(job["job_id"])


# ---------------------------------------------------------------------- large contexts
@pytest.fixture(scope="module")
def roomy_stack() -> Iterator[RunningStack]:
    """A stack with the deployed context limit (50 MiB): the session stack keeps contexts to 1 MiB."""
    stack = start_stack({"SPOOL_SIMULATOR_FAULTS": "1"})
    yield stack
    stop_stack(stack)


def write_project(root: Path, megabytes: int) -> None:
    """Many text files, ``megabytes`` in all (each a few hundred KB, as source trees have them)."""
    line = "def handler(event, context):  # a line of code as a repository holds many\n"
    body = line * (250_000 // len(line))
    for index in range(megabytes * 4):
        folder = root / f"pkg{index % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"module_{index}.py").write_text(f"# module {index}\n{body}")


def test_a_20_mb_directory_goes_through_the_presigned_upload_and_a_resync_changes_nothing(
    roomy_stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOOL_CACHE_DIR", str(tmp_path / "cache"))
    project = tmp_path / "project"
    write_project(project, 20)
    (project / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    reports: list[tuple[str, int, int]] = []
    with Client(roomy_stack.base_url, DEV_KEY, timeout=120) as client:
        first = client.sync_directory(project, progress=lambda *report: reports.append(report))
        assert first["uploaded_via"] == "presigned" and first["changed"] is True
        assert first["file_count"] == 80 and first["size_bytes"] > 19_000_000
        assert first["skipped"] == [{"path": "logo.png", "reason": "binary"}]
        uploads = [(done, total) for stage, done, total in reports if stage == "upload"]
        assert uploads[-1][0] == uploads[-1][1] > 20_000_000  # every byte reported, to the total
        assert ("read", 81, 81) in reports

        again = client.sync_directory(project)
        assert (again["changed"], again["uploaded_via"]) == (False, "none")
        assert again["context_id"] == first["context_id"]
        assert client.get_context(first["context_id"])["version"] == first["version"] == again["version"]


# ---------------------------------------------------------------------- AsyncClient
async def drain(stream: AsyncJobStream, into: list[str]) -> None:
    async for text in stream:
        into.append(text)


def test_the_async_client_creates_streams_and_syncs(
    dev_stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOOL_CACHE_DIR", str(tmp_path / "cache"))
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text("def handler():\n    return 1\n")

    async def main() -> None:
        async with AsyncClient(dev_stack.base_url, DEV_KEY) as client:
            synced = await client.sync_directory(project)
            assert (synced["file_count"], synced["changed"]) == (1, True)
            assert (await client.sync_directory(project))["changed"] is False
            job = await client.create_job(
                "async", model="sim-fast", max_tokens=30, context_id=synced["context_id"]
            )
            completed: list[str] = []
            stream = client.stream(job["job_id"])
            await drain(stream, completed)
            assert "".join(completed) == (await client.job(job["job_id"]))["output"]
            assert stream.result is not None and stream.result["status"] == "completed"

            failing = await client.create_job("async fail", model="sim-fast", max_tokens=200, metadata=FATAL)
            for transport in TRANSPORTS:
                partial: list[str] = []
                with pytest.raises(JobFailed) as raised:
                    await drain(client.stream(failing["job_id"], transport=transport), partial)
                assert raised.value.last_sequence_id == len(partial) > 0
                assert raised.value.usage is not None and raised.value.usage["output_tokens"] == 30

    asyncio.run(main())
