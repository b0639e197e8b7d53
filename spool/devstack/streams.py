"""Lambda's DynamoDB Streams event source mapping, locally: poll the table's stream on the moto
server and invoke the function with real stream event batches, in order, from LATEST, with the
event's ``FilterCriteria`` applied before the function is invoked (as Lambda does)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from spool.devstack.runtime import InvocationError, LocalFunction

log = logging.getLogger("devstack.streams")
Observer = Callable[[list[dict[str, Any]]], None]


def matches(pattern: Mapping[str, Any], value: Any) -> bool:
    """Whether a record matches an event filter pattern (the subset Lambda filters use here: nested
    objects, lists of allowed values, and ``{"exists": bool}`` / ``{"prefix": str}`` tests)."""
    if not isinstance(value, Mapping):
        return False
    for key, expected in pattern.items():
        present = key in value
        if isinstance(expected, Mapping):
            if not present or not matches(expected, value[key]):
                return False
            continue
        if not any(_allowed(rule, present, value.get(key)) for rule in expected):
            return False
    return True


def _allowed(rule: Any, present: bool, actual: Any) -> bool:
    if isinstance(rule, Mapping):
        if "exists" in rule:
            return bool(rule["exists"]) == present
        if "prefix" in rule:
            return present and isinstance(actual, str) and actual.startswith(rule["prefix"])
        raise ValueError(f"unsupported filter rule {rule!r}")
    return present and actual == rule


class StreamPoller:
    def __init__(
        self,
        streams: Any,
        stream_arn: str,
        function: LocalFunction,
        *,
        batch_size: int,
        region: str,
        filters: Sequence[Mapping[str, Any]] = (),
        observers: Sequence[Observer] = (),
        interval: float = 0.05,
    ) -> None:
        self._streams = streams
        self._arn = stream_arn
        self._function = function
        self._batch = batch_size
        self._region = region
        self._filters = list(filters)
        self._observers = list(observers)
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
                if iterator is None or self._stop.is_set():
                    continue
                try:
                    self._iterators[shard] = self._poll(iterator)
                except Exception:
                    if not self._stop.is_set():
                        log.exception("stream poll failed; retrying")

    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as Lambda passes it: boto3's datetime back to epoch seconds, the source added."""
        data = dict(record.get("dynamodb") or {})
        created = data.get("ApproximateCreationDateTime")
        if isinstance(created, datetime):
            data["ApproximateCreationDateTime"] = int(created.timestamp())
        return {**record, "dynamodb": data, "eventSourceARN": self._arn, "awsRegion": self._region}

    def _poll(self, iterator: str) -> str | None:
        response = self._streams.get_records(ShardIterator=iterator, Limit=self._batch)
        records = [self._record(r) for r in response.get("Records", [])]
        for observe in self._observers:
            observe(records)
        if self._filters:
            records = [r for r in records if any(matches(p, r) for p in self._filters)]
        if records:
            try:
                result = self._function.invoke({"Records": records})
            except InvocationError as exc:
                log.warning("%s; the batch is retried", exc)
                return iterator  # Lambda retries the batch
            failures = (result or {}).get("batchItemFailures") if isinstance(result, dict) else None
            if failures:
                log.warning("stream handler reported %d failed records", len(failures))
        next_iterator: str | None = response.get("NextShardIterator")
        return next_iterator


class JobTransitions:
    """An observer of the jobs table's stream that logs each job's status changes (queued, running,
    then how it ended), so `make dev` shows what the worker does without reading its logs."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("devstack.jobs")
        self._last: dict[str, tuple[str, int]] = {}

    def __call__(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            data = record.get("dynamodb") or {}
            tenant, _, rest = str((data.get("Keys") or {}).get("pk", {}).get("S", "")).partition("#")
            kind, _, job_id = rest.partition("#")
            image = data.get("NewImage") or {}
            if kind != "job" or "status" not in image:
                continue
            status = image["status"].get("S", "")
            attempts = int(image.get("attempts", {}).get("N", "0"))
            if self._last.get(job_id) == (status, attempts):
                continue
            self._last[job_id] = (status, attempts)
            self._log.info("job %s %s", job_id, self._describe(status, attempts, image, tenant))
            if status in {"completed", "failed", "cancelled"}:
                self._last.pop(job_id, None)

    @staticmethod
    def _describe(status: str, attempts: int, image: dict[str, Any], tenant: str) -> str:
        model = image.get("model_resolved", {}).get("S", "")
        if status == "queued":
            return f"queued (tenant {tenant}, {model})"
        if status == "running":
            return f"running (attempt {attempts})"
        usage = image.get("usage", {}).get("M", {})
        tokens = usage.get("output_tokens", {}).get("N", "0")
        cost = int(image.get("cost_nanos", {}).get("N", "0"))
        text = f"{status}: {tokens} tokens out, ${cost / 1e9:.6f}"
        error = image.get("error", {}).get("M", {})
        if status == "failed" and error:
            text += f" ({error.get('code', {}).get('S', '')})"
        return text
