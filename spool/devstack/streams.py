"""Lambda's DynamoDB Streams event source mapping, locally: poll the table's stream on the moto
server and invoke the function with real stream event batches, in order, from LATEST."""

from __future__ import annotations

import logging
import threading
from typing import Any

from spool.devstack.runtime import LocalFunction

log = logging.getLogger("devstack.streams")


class StreamPoller:
    def __init__(
        self,
        streams: Any,
        stream_arn: str,
        function: LocalFunction,
        *,
        batch_size: int,
        region: str,
        interval: float = 0.05,
    ) -> None:
        self._streams = streams
        self._arn = stream_arn
        self._function = function
        self._batch = batch_size
        self._region = region
        self._interval = interval
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._iterators: dict[str, str | None] = {}
        for shard in streams.describe_stream(StreamArn=stream_arn)["StreamDescription"].get("Shards", []):
            iterator = streams.get_shard_iterator(
                StreamArn=stream_arn, ShardId=shard["ShardId"], ShardIteratorType="LATEST"
            )["ShardIterator"]
            self._iterators[shard["ShardId"]] = iterator

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            self._running.wait()
            for shard, iterator in list(self._iterators.items()):
                if iterator is None:
                    continue
                try:
                    self._iterators[shard] = self._poll(iterator)
                except Exception:
                    log.exception("stream poll failed; retrying")

    def _poll(self, iterator: str) -> str | None:
        response = self._streams.get_records(ShardIterator=iterator, Limit=self._batch)
        records = [
            {**r, "eventSourceARN": self._arn, "awsRegion": self._region} for r in response.get("Records", [])
        ]
        if records:
            try:
                result = self._function.invoke({"Records": records})
            except Exception:
                log.exception("stream handler failed")
                return iterator  # Lambda retries the batch
            failures = (result or {}).get("batchItemFailures") if isinstance(result, dict) else None
            if failures:
                log.warning("stream handler reported %d failed records", len(failures))
        next_iterator: str | None = response.get("NextShardIterator")
        return next_iterator
