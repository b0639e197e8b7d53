"""The local stack's state across a clean stop and start (``SPOOL_STATE_DIR``).

moto keeps everything in memory. On a clean stop, once nothing runs any more, the stack reads every
table, object, queued message and secret of the template's resources through the AWS APIs and
writes them under the state directory; on the next start it writes them back through the same APIs,
before anything is served (so signed links such as links.events outlive a restart). Resources are
matched by logical id, so the physical names moto makes up each time do not matter. A crash
(SIGKILL, power loss) loses what happened since the last clean stop.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import boto3
from botocore.exceptions import ClientError, ParamValidationError

from spool.devstack.provision import CREDENTIALS, StackDescription
from spool.devstack.template import Template

log = logging.getLogger("devstack.stack")
FORMAT_VERSION = 1


class StateUnusable(Exception):
    """The state directory cannot be used (another stack holds it, it cannot be written, or its
    snapshot is damaged): said before anything runs, with what to do."""


STOPPED = "stopped"  # what the lock file holds once its stack stopped with nothing left unsaved


class StateLock:
    """An exclusive lock on a state directory for a stack's life: two stacks on one directory would
    each save over the other's work. The file names its holder (``pid N``) while it runs, and says
    ``stopped`` once it stopped with its work saved: a holder's name found at the next start is a
    stack that did not stop (killed, crashed, the machine went down)."""

    def __init__(self, handle: Any, previous: Unclean | None = None) -> None:
        self._handle = handle
        self.previous = previous  # the last stack on this directory, when it did not stop

    def release(self, *, stopped: bool = True, loaded: bool = True) -> None:
        """``stopped``: nothing this stack did is left unsaved. ``loaded``: it read the directory's
        snapshot (and said what a stack before it lost); one that stopped before passes the word on."""
        mark = STOPPED if stopped else None
        if not loaded and self.previous is not None:
            mark = self.previous.line()
        with contextlib.suppress(OSError):
            if mark is not None:
                self._handle.seek(0)
                self._handle.truncate()
                self._handle.write(mark)
                self._handle.flush()
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


class Unclean(NamedTuple):
    """A stack that held a state directory and never stopped: its name, and when it started."""

    holder: str
    started: float

    @classmethod
    def parse(cls, line: str, written: float) -> Unclean | None:
        """The lock file's ``pid N started T`` (``pid N`` from an older Spool: started when the file
        was written), or None for a stack that stopped."""
        if not line.startswith("pid "):
            return None
        holder, _, started = line.partition(" started ")
        try:
            return cls(holder, float(started)) if started else cls(holder, written)
        except ValueError:
            return cls(holder, written)

    def line(self) -> str:
        return f"{self.holder} started {self.started!r}"

    def lost_since(self, saved_at: float | None) -> str | None:
        """What the next start should say, restoring a snapshot saved at ``saved_at`` (None: there is
        none); None when that snapshot holds this stack's work after all (a stop by an older Spool,
        which left no mark)."""
        if saved_at is not None and saved_at >= self.started:
            return None
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        kept = (
            f"restored the snapshot saved {_age(time.time() - saved_at)} ago, before it started"
            if saved_at is not None
            else "no snapshot was ever saved here"
        )
        return (
            f"the last local stack here ({self.holder}, started {started}) did not stop: {kept};"
            " what it did is lost"
        )


def _age(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"


def lock_state_dir(directory: Path) -> StateLock:
    """Create ``directory`` if needed and hold its lock (a file in it, so a directory that cannot be
    written is found here, at the start, not at the stop that would have saved the work)."""
    path = directory / ".lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as exc:
        raise StateUnusable(
            f"cannot keep the local state in {directory}: {exc.strerror or exc}; set SPOOL_STATE_DIR"
            " to a directory you can write (or to nothing, to keep no state)"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        running = Unclean.parse(handle.read().strip(), 0)
        holder = running.holder if running is not None else "another process"
        handle.close()
        raise StateUnusable(
            f"another local stack ({holder}) keeps its state in {directory}; stop it first, or set"
            " SPOOL_STATE_DIR to another directory (two stacks would each save over the other's work)"
        ) from None
    handle.seek(0)
    previous = Unclean.parse(handle.read().strip(), os.fstat(handle.fileno()).st_mtime)
    handle.seek(0)
    handle.truncate()
    handle.write(Unclean(f"pid {os.getpid()}", time.time()).line())
    handle.flush()
    return StateLock(handle, previous)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": base64.b64encode(value).decode()}
    raise TypeError(f"cannot store {type(value).__name__}")


def _decode(value: dict[str, Any]) -> Any:
    return base64.b64decode(value["__bytes__"]) if set(value) == {"__bytes__"} else value


class LocalState:
    def __init__(self, directory: Path, template: Template, description: StackDescription) -> None:
        self.directory = directory
        self._template = template
        self._description = description
        self._clients: dict[str, Any] = {}
        self._session: boto3.session.Session | None = None
        self._reading = directory
        self.saved_at: float | None = None  # when the snapshot restore() read was saved

    @property
    def _current(self) -> Path:
        return self.directory / "snapshot"

    def _client(self, service: str) -> Any:
        """One client per service (building one costs ~0.1 s, and a save used one per table)."""
        if service not in self._clients:
            if self._session is None:  # one session: its loader reads each service model once
                self._session = boto3.session.Session(
                    aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    aws_session_token=CREDENTIALS["AWS_SESSION_TOKEN"],
                    region_name=self._description.region,
                )
            self._clients[service] = self._session.client(  # type: ignore[call-overload]
                service, endpoint_url=self._description.endpoint_url
            )
        return self._clients[service]

    def _await_in_flight(self) -> None:
        """Wait for messages still hidden to come back to their queues, at most each queue's visibility
        timeout: a message whose invocation died (a crashed worker) stays hidden until then, and a
        snapshot taken before would not hold it (its job would sit `running` until the sweeper)."""
        sqs = self._client("sqs")
        names = ["ApproximateNumberOfMessagesNotVisible", "VisibilityTimeout"]
        for url in self._resources("AWS::SQS::Queue").values():
            deadline: float | None = None
            while True:
                attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
                hidden = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
                if hidden == 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + int(attributes.get("VisibilityTimeout", 30)) + 1
                    log.info(
                        "waiting for %d message(s) in flight to return to %s", hidden, url.rsplit("/", 1)[-1]
                    )
                elif time.monotonic() >= deadline:
                    log.warning("%d message(s) still in flight are not in the snapshot", hidden)
                    break
                time.sleep(0.2)

    def _resources(self, kind: str) -> dict[str, str]:
        """Logical id -> physical name (or queue URL) of the template's resources of one type."""
        return {
            name: self._description.refs[name]
            for name in self._template.resources_of_type(kind)
            if name in self._description.refs
        }

    # ------------------------------------------------------------------ save
    def save(self) -> dict[str, int]:
        """Write the snapshot (atomically: a stop interrupted half-way keeps the previous one)."""
        self._await_in_flight()
        staging = self.directory / "snapshot.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        counts = {"items": 0, "objects": 0, "messages": 0}
        manifest: dict[str, Any] = {"version": FORMAT_VERSION, "saved_at": time.time()}
        manifest["tables"] = {}
        for logical, table in self._resources("AWS::DynamoDB::Table").items():
            path = staging / f"table-{logical}.jsonl"
            with path.open("w") as out:
                for item in self._scan(table):
                    out.write(json.dumps(item, default=_encode) + "\n")
                    counts["items"] += 1
            manifest["tables"][logical] = path.name
        manifest["buckets"] = {}
        for logical, bucket in self._resources("AWS::S3::Bucket").items():
            folder = staging / f"bucket-{logical}"
            folder.mkdir()
            manifest["buckets"][logical] = entries = []
            for index, (key, content_type, body) in enumerate(self._objects(bucket)):
                (folder / str(index)).write_bytes(body)
                entries.append({"key": key, "file": f"{folder.name}/{index}", "content_type": content_type})
                counts["objects"] += 1
        manifest["queues"] = {}
        for logical, url in self._resources("AWS::SQS::Queue").items():
            messages = list(self._drain(url))
            manifest["queues"][logical] = messages
            counts["messages"] += len(messages)
        manifest["secrets"] = {}  # signed links (links.events) stay valid across a restart
        secrets = self._client("secretsmanager")
        for logical, arn in self._resources("AWS::SecretsManager::Secret").items():
            manifest["secrets"][logical] = secrets.get_secret_value(SecretId=arn)["SecretString"]
        (staging / "manifest.json").write_text(json.dumps(manifest))
        previous = self.directory / "snapshot.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if self._current.exists():
            self._current.rename(previous)
        staging.rename(self._current)
        shutil.rmtree(previous, ignore_errors=True)
        return counts

    def _scan(self, table: str) -> Iterator[dict[str, Any]]:
        ddb = self._client("dynamodb")
        kwargs: dict[str, Any] = {"TableName": table}
        while True:
            page = ddb.scan(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _objects(self, bucket: str) -> Iterator[tuple[str, str, bytes]]:
        s3 = self._client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for entry in page.get("Contents", []):
                response = s3.get_object(Bucket=bucket, Key=entry["Key"])
                yield entry["Key"], response.get("ContentType", ""), response["Body"].read()

    def _drain(self, url: str) -> Iterator[dict[str, Any]]:
        """Every visible message (the stack has made its in-flight ones visible before saving)."""
        sqs = self._client("sqs")
        while True:
            received = sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=300,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not received:
                return
            for message in received:
                yield {"body": message["Body"], "attributes": message.get("MessageAttributes") or {}}

    # ------------------------------------------------------------------ restore
    def restore(self) -> dict[str, int] | None:
        """Write the last snapshot back (None when there is none); ``StateUnusable`` naming the file
        when the snapshot cannot be read (a file missing, cut short or not JSON)."""
        reading = self._current / "manifest.json"
        if not reading.exists():
            return None
        try:
            return self._restore(reading)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._unusable(f"is damaged ({self._reading.name}: {exc})") from exc
        except (ClientError, ParamValidationError) as exc:  # the template's tables changed since
            raise self._unusable(f"does not fit this template's resources ({exc})") from exc

    def _unusable(self, why: str) -> StateUnusable:
        aside = self._current.with_name("snapshot.unused")
        return StateUnusable(
            f"the local state in {self._current} {why}; move it aside to start without it"
            f" (mv {self._current} {aside}), or set SPOOL_STATE_DIR to another directory"
        )

    def _restore(self, path: Path) -> dict[str, int] | None:
        self._reading = path  # the file a damaged snapshot is reported by
        manifest = json.loads(path.read_text())
        saved_at = manifest.get("saved_at")
        self.saved_at = float(saved_at) if isinstance(saved_at, int | float) else None
        if manifest.get("version") != FORMAT_VERSION:
            log.warning("ignoring local state in %s: written by another version", self._current)
            return None
        counts = {"items": 0, "objects": 0, "messages": 0}
        tables = self._resources("AWS::DynamoDB::Table")
        for logical, name in manifest["tables"].items():
            if logical not in tables:
                log.warning("local state of %s skipped: the template has no such table now", logical)
                continue
            self._reading = self._current / name
            with self._reading.open() as lines:
                items = [json.loads(line, object_hook=_decode) for line in lines if line.strip()]
            self._put_items(tables[logical], items)
            counts["items"] += len(items)
        buckets = self._resources("AWS::S3::Bucket")
        s3 = self._client("s3")
        for logical, entries in manifest["buckets"].items():
            for entry in entries if logical in buckets else []:
                self._reading = self._current / entry["file"]
                body = self._reading.read_bytes()
                extra = {"ContentType": entry["content_type"]} if entry["content_type"] else {}
                s3.put_object(Bucket=buckets[logical], Key=entry["key"], Body=body, **extra)
                counts["objects"] += 1
        queues = self._resources("AWS::SQS::Queue")
        sqs = self._client("sqs")
        for logical, messages in manifest["queues"].items():
            for start in range(0, len(messages) if logical in queues else 0, 10):
                entries = [
                    {"Id": str(i), "MessageBody": m["body"], "MessageAttributes": m["attributes"]}
                    for i, m in enumerate(messages[start : start + 10])
                ]
                sqs.send_message_batch(QueueUrl=queues[logical], Entries=entries)
                counts["messages"] += len(entries)
        secrets = self._client("secretsmanager")
        known = self._resources("AWS::SecretsManager::Secret")
        for logical, value in manifest.get("secrets", {}).items():
            if logical in known:
                secrets.put_secret_value(SecretId=known[logical], SecretString=value)
        return counts

    def _put_items(self, table: str, items: list[dict[str, Any]]) -> None:
        ddb = self._client("dynamodb")
        pending = [{"PutRequest": {"Item": item}} for item in items]
        while pending:
            batch, pending = pending[:25], pending[25:]
            left = ddb.batch_write_item(RequestItems={table: batch}).get("UnprocessedItems") or {}
            pending.extend(left.get(table, []))
