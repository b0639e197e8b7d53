"""The side-by-side bench's loopback provider: its own process, read with the official SDK."""

from __future__ import annotations

import httpx2

from bench.side_by_side import Upstream, read_direct


def test_the_loopback_upstream_streams_from_its_own_process_and_stops_with_the_bench() -> None:
    with Upstream() as upstream:
        stream = read_direct(upstream.base_url, "loop-0", 5)
        assert len(stream.arrivals) == 5
        missing = httpx2.get(f"{upstream.base_url}/models", timeout=10)
        assert missing.status_code == 404
        process = upstream._process
        assert process is not None and process.poll() is None
    assert process.poll() is not None  # stopped with the bench
