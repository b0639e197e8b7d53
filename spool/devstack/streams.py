"""Lambda's DynamoDB Streams event source mapping, locally: poll the table's stream on the moto
server and invoke the function with real stream event batches, in order, from LATEST, with the
event's ``FilterCriteria`` applied before the function is invoked (as Lambda does).

A batch whose invocation fails is retried as it is until it goes through. Records the function
reports failed (``batchItemFailures``, ReportBatchItemFailures) are retried as Lambda retries them:
the records before the lowest failed one are done, the batch goes on from it; a record that still
fails after ``max_retry_attempts`` retries (the event's MaximumRetryAttempts) is skipped (logged: on
AWS it goes to the OnFailure destination) and the rest of its batch delivered.

An idle stack should cost nothing: with ``StreamChanges`` (the moto server's count of stream records
written, see ``moto_server``) a poller reads the stream only after a record was written, and waits
on the server in between (one request every few seconds when nothing happens). Without it, a poller
reads every ``interval`` while records come, and backs off to ``idle_interval`` when none do."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import threading
import time
import urllib.parse
from collections import deque
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


class StreamChanges:
    """The moto server's count of stream records written (``GET /_spool/stream-changes``) to ``table``
    (a table's name; None: to any), over one kept-alive connection per thread."""

    def __init__(self, endpoint_url: str, wait_seconds: float = 2.0, table: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(endpoint_url)
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 80
        self.wait_seconds = wait_seconds
        self._query = f"&table={urllib.parse.quote(table)}" if table else ""
        self._local = threading.local()

    def wait(self, after: int) -> int:
        """The count once it passes ``after``, or after ``wait_seconds``; ``OSError`` when the server
        cannot be reached."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self.wait_seconds + 10)
            self._local.connection = connection
        try:
            connection.request(
                "GET", f"/_spool/stream-changes?after={after}&timeout={self.wait_seconds:g}{self._query}"
            )
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            self._local.connection = None
            raise OSError(f"stream changes: {exc}") from exc
        if response.status != 200:
            raise OSError(f"stream changes: HTTP {response.status}")
        return int(body)


class StreamPoller:
    def __init__(
        self,
        streams: Any,
        stream_arn: str,
        function: LocalFunction | None,
        *,
        batch_size: int,
        region: str,
        parallelization: int = 1,
        filters: Sequence[Mapping[str, Any]] = (),
        observers: Sequence[Observer] = (),
        interval: float = 0.05,
        idle_interval: float = 1.0,
        changes: StreamChanges | None = None,
        max_retry_attempts: int | None = None,
    ) -> None:
        self._streams = streams
        self._arn = stream_arn
        self._function = function
        self._batch = batch_size
        self._lanes = max(1, parallelization)
        self._region = region
        self._filters = list(filters)
        self._observers = list(observers)
        self._interval = interval
        self._idle_interval = max(interval, idle_interval)
        self._changes = changes
        self._max_retries = max_retry_attempts  # of a record reported failed (None: until it goes through)
        self.polls = 0  # GetRecords calls made (the idle cost)
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._iterators: dict[str, str | None] = {}
        self._lane_workers: dict[int, _Lane] = {}
        self._lanes_lock = threading.Lock()
        for shard in streams.describe_stream(StreamArn=stream_arn)["StreamDescription"].get("Shards", []):
            iterator = streams.get_shard_iterator(
                StreamArn=stream_arn, ShardId=shard["ShardId"], ShardIteratorType="LATEST"
            )["ShardIterator"]
            self._iterators[shard["ShardId"]] = iterator

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        with self._lanes_lock:
            lanes = list(self._lane_workers.values())
        for lane in lanes:
            lane.close(timeout=5.0)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def run(self) -> None:
        seen = -1  # the server's count of records written when the stream was last read
        delay = self._interval
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                return
            if self._changes is not None:
                try:
                    count = self._changes.wait(seen)
                except OSError:
                    if not self._stop.is_set():
                        log.warning("cannot wait for stream changes; polling instead")
                    self._changes = None
                    continue
                if count == seen or self._stop.is_set():
                    continue  # nothing was written
                seen = count
                # The count is read before the stream: a record written from now on passes it.
                while self._poll_shards()[1] and not self._stop.is_set():
                    pass  # a full batch: read on before waiting
                continue
            read, _ = self._poll_shards()
            # Records came: read again soon. None: back off, up to idle_interval.
            delay = self._interval if read else min(self._idle_interval, delay * 2)
            self._stop.wait(delay)

    def _poll_shards(self) -> tuple[int, bool]:
        """Read each shard once: how many records came, and whether a batch was full (more wait)."""
        read, full = 0, False
        for shard, iterator in list(self._iterators.items()):
            if iterator is None or self._stop.is_set():
                continue
            try:
                self._iterators[shard], count = self._poll(iterator)
                read += count
                full = full or count >= self._batch
            except Exception:
                if not self._stop.is_set():
                    log.exception("stream poll failed; retrying")
                    self._stop.wait(self._interval)
        return read, full

    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as Lambda passes it: boto3's datetime back to epoch seconds, the source added."""
        data = dict(record.get("dynamodb") or {})
        created = data.get("ApproximateCreationDateTime")
        if isinstance(created, datetime):
            data["ApproximateCreationDateTime"] = int(created.timestamp())
        return {**record, "dynamodb": data, "eventSourceARN": self._arn, "awsRegion": self._region}

    def _poll(self, iterator: str) -> tuple[str | None, int]:
        """Read one batch and invoke the function; the next iterator and how many records were read."""
        self.polls += 1
        response = self._streams.get_records(ShardIterator=iterator, Limit=self._batch)
        records = [self._record(r) for r in response.get("Records", [])]
        read = len(records)
        for observe in self._observers:
            observe(records)
        if self._filters:
            records = [r for r in records if any(matches(p, r) for p in self._filters)]
        if records and self._function is not None:
            if self._lanes == 1:
                self._deliver_all(records)
            elif not self._stop.is_set():
                for lane, batch in self._lanes_of(records).items():
                    self._lane(lane).put(batch)
        next_iterator: str | None = response.get("NextShardIterator")
        return next_iterator, read

    def _lane(self, number: int) -> _Lane:
        with self._lanes_lock:
            if number not in self._lane_workers:
                self._lane_workers[number] = _Lane(
                    self._deliver_all, self._batch, self._stop, self._interval, f"stream-lane-{number}"
                )
            return self._lane_workers[number]

    def idle(self, timeout: float) -> bool:
        """Whether every lane delivered what it was given, within ``timeout`` seconds (tests)."""
        deadline = time.monotonic() + timeout
        return all(
            lane.idle(max(0.0, deadline - time.monotonic())) for lane in list(self._lane_workers.values())
        )

    def _lanes_of(self, records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        """The records split as Lambda may split a shard with a ParallelizationFactor: it keeps order
        only "at the item (partition and sort key) level" (the Lambda guide, with-ddb), so one item's
        records stay in one lane, in order, and the items of one partition key may be spread over
        lanes and delivered out of order, at once."""
        lanes: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            keys = (record.get("dynamodb") or {}).get("Keys") or {}
            item = json.dumps(keys, sort_keys=True)
            lane = int(hashlib.sha256(item.encode()).hexdigest(), 16) % self._lanes
            lanes.setdefault(lane, []).append(record)
        return lanes

    def _deliver_all(self, records: list[dict[str, Any]]) -> None:
        """Invoke the function with ``records`` until each went through or was given up, as Lambda
        does: a failed invocation retries the batch as it is (until it goes through); records reported
        failed retry the batch from the lowest of them, whose retries are counted and bounded by
        ``max_retry_attempts``. Waits ``interval`` between attempts, and while the poller is paused."""
        failures = 0  # how many times the first of ``records`` was reported failed
        while records and not self._stop.is_set():
            self._running.wait()  # paused: the batch waits
            if self._stop.is_set():
                return
            try:
                left = self._deliver(records)
            except Exception:  # whatever failed (a container that could not start): the batch is retried
                log.exception("stream delivery failed; the batch is retried")
                left = None
            if left is not None:
                failures = failures + 1 if left and left[0] is records[0] else 1
                records = left
                if not records:
                    return
                if self._max_retries is not None and failures > self._max_retries:
                    log.warning(
                        "stream record %s still failed after %d retries; skipped",
                        _sequence_number(records[0]),
                        self._max_retries,
                    )
                    records, failures = records[1:], 0
                    continue
            self._stop.wait(self._interval)

    def _deliver(self, records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """One invocation: the records left to deliver (none when all went through; from the lowest
        one reported failed), or None when the invocation failed (the batch is retried as it is)."""
        assert self._function is not None
        try:
            result = self._function.invoke({"Records": records})
        except InvocationError as exc:
            log.warning("%s; the batch is retried", exc)
            return None
        failures = (result or {}).get("batchItemFailures") if isinstance(result, dict) else None
        if not failures:
            return []
        numbers = [_sequence_number(record) for record in records]
        failed = [f.get("itemIdentifier") if isinstance(f, Mapping) else None for f in failures]
        # An identifier that names no record of the batch fails the whole batch (as on Lambda).
        named = all(isinstance(i, str) and i in numbers for i in failed)
        lowest = min(numbers.index(i) for i in failed) if named else 0
        log.warning(
            "stream handler reported %d failed records; retrying from %s",
            len(failures),
            _sequence_number(records[lowest]),
        )
        return records[lowest:]


def _sequence_number(record: Mapping[str, Any]) -> str | None:
    number = (record.get("dynamodb") or {}).get("SequenceNumber")
    return str(number) if number is not None else None


class _Lane:
    """One of a shard's concurrent batches (a ParallelizationFactor above 1), as Lambda runs them: each
    lane invokes the function with its records in order, one batch at a time, and retries a failed
    batch (``deliver``, the poller's retries) before its next, while the other lanes go on (a slow or
    cold invocation holds back only the keys of its own lane). Its next batch is what came to it
    meanwhile, in order, up to the batch size. The poller reads on and hands each lane its share, up
    to ``MAX_PENDING`` reads ahead (then it waits for the lane); a paused poller's lanes hold their
    records too (records wait, as in the stream)."""

    MAX_PENDING = 16

    def __init__(
        self,
        deliver: Callable[[list[dict[str, Any]]], None],
        batch_size: int,
        stop: threading.Event,
        interval: float,
        name: str,
    ) -> None:
        self._deliver = deliver
        self._batch_size = max(1, batch_size)
        self._stop = stop
        self._interval = interval
        self._waiting: deque[list[dict[str, Any]]] = deque()  # the records of each read, in order
        self._pending = 0  # reads waiting or in flight
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, records: list[dict[str, Any]]) -> None:
        with self._changed:
            while self._pending >= self.MAX_PENDING and not self._stop.is_set():
                self._changed.wait(self._interval)
            self._waiting.append(records)
            self._pending += 1
            self._changed.notify_all()

    def idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not (self._waiting or self._closed or self._stop.is_set()):
                    self._changed.wait(1.0)
                if self._stop.is_set() or not self._waiting:
                    return
                batch, taken = list(self._waiting.popleft()), 1
                while self._waiting and len(batch) + len(self._waiting[0]) <= self._batch_size:
                    batch.extend(self._waiting.popleft())
                    taken += 1
            self._deliver(batch)  # retried until it went through or was given up, before the lane's next
            with self._changed:
                self._pending -= taken
                self._changed.notify_all()


class JobTransitions:
    """An observer of the jobs table's stream that logs each job's status changes (queued, running,
    then how it ended), so `make dev` shows what the worker does without reading its logs."""

    def __init__(
        self, logger: logging.Logger | None = None, quiet_tenants: frozenset[str] = frozenset()
    ) -> None:
        self._log = logger or logging.getLogger("devstack.jobs")
        self._quiet = quiet_tenants  # their jobs are logged at DEBUG (the stack's warm-up job)
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
            level = logging.DEBUG if tenant in self._quiet else logging.INFO
            self._log.log(level, "job %s %s", job_id, self._describe(status, attempts, image, tenant))
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
