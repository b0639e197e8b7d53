"""The context store's S3 and DynamoDB adapters, each bound to one tenant's scope."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from spool_core.adapters.dynamodb import ConditionFailed, ScopedTable
from spool_core.adapters.listing import LIST_INDEX, LIST_KEY, LIST_POSITION, list_attributes, query_index
from spool_core.clock import rfc3339, utc_now
from spool_core.contexts.model import BlobInfo, ContextRecord, Manifest
from spool_core.contexts.ports import (
    ConcurrentUpdate,
    ContextExists,
    ListedContext,
    UploadChanged,
    UploadHead,
    manifest_name,
)
from spool_core.listing import position
from spool_core.tenancy import TenantScope

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CONTEXT_KIND = "ctx"
BLOB_KIND = "blob"
UPLOADS_ROOT = "uploads"
UPLOAD_BUDGET_KIND = "uploads"  # one counter item per tenant and hour
USED_UPLOAD_KIND = "upload"  # an upload that made a context, while its URL could still be used
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in _MISSING


class S3BlobStore:
    def __init__(self, client: S3Client, bucket: str, scope: TenantScope) -> None:
        self._client = client
        self._bucket = bucket
        self._scope = scope

    def _key(self, sha256: str) -> str:
        return self._scope.object_key("blobs", sha256)

    def put(self, sha256: str, data: bytes) -> None:
        self._client.put_object(
            Bucket=self._bucket, Key=self._key(sha256), Body=data, ContentType="text/plain; charset=utf-8"
        )

    def get(self, sha256: str) -> bytes:
        try:
            body: bytes = self._client.get_object(Bucket=self._bucket, Key=self._key(sha256))["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise KeyError(sha256) from exc
            raise
        return body

    def refresh(self, sha256: str) -> None:
        key = self._key(sha256)
        try:
            self._client.copy_object(
                Bucket=self._bucket,
                Key=key,
                CopySource={"Bucket": self._bucket, "Key": key},
                MetadataDirective="REPLACE",
                Metadata={"refreshed-at": rfc3339(utc_now())},
                ContentType="text/plain; charset=utf-8",
            )
        except ClientError as exc:
            if _missing(exc):
                raise KeyError(sha256) from exc
            raise


class S3RequestStore:
    """A job's messages too large for its item (``spool_core.jobs.stored``), by their SHA-256, under
    the tenant's prefix (``t/``: kept as long as the bucket keeps context blobs, days past any job's
    last attempt)."""

    def __init__(self, client: S3Client, bucket: str, scope: TenantScope) -> None:
        self._client = client
        self._bucket = bucket
        self._scope = scope

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        key = self._scope.object_key("requests", sha256)
        self._client.put_object(Bucket=self._bucket, Key=key, Body=data, ContentType="application/json")
        return sha256

    def get(self, sha256: str) -> bytes:
        key = self._scope.object_key("requests", sha256)
        try:
            body: bytes = self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise KeyError(sha256) from exc
            raise
        return body


class S3ManifestStore:
    def __init__(self, client: S3Client, bucket: str, scope: TenantScope) -> None:
        self._client = client
        self._bucket = bucket
        self._scope = scope

    def put(self, manifest: Manifest) -> str:
        body = manifest.model_dump_json().encode()
        key = self._scope.object_key("contexts", manifest.context_id, manifest_name(manifest.version, body))
        self._client.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/json")
        return key

    def get(self, key: str) -> Manifest:
        body = self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        return Manifest.model_validate_json(body)

    def find(self, key: str) -> Manifest | None:
        try:
            return self.get(key)
        except self._client.exceptions.NoSuchKey:
            return None

    def delete_all(self, context_id: str) -> None:
        prefix = self._scope.object_key("contexts", context_id) + "/"
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            objects: Any = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True})


class S3UploadStore:
    """Documents clients PUT through presigned URLs, under ``uploads/<tenant>/`` (expired after a day)."""

    def __init__(self, client: S3Client, bucket: str, scope: TenantScope) -> None:
        self._client = client
        self._bucket = bucket
        self._scope = scope

    def _key(self, upload_id: str) -> str:
        return self._scope.object_key(upload_id, root=UPLOADS_ROOT)

    def presign_put(self, upload_id: str, expires_in: int) -> str:
        url: str = self._client.generate_presigned_url(
            "put_object", Params={"Bucket": self._bucket, "Key": self._key(upload_id)}, ExpiresIn=expires_in
        )
        return url

    def presign_post(self, upload_id: str, expires_in: int, max_bytes: int) -> dict[str, Any]:
        # S3 checks the policy's content-length-range as the form arrives: nothing larger is stored.
        form: dict[str, Any] = self._client.generate_presigned_post(
            Bucket=self._bucket,
            Key=self._key(upload_id),
            Conditions=[["content-length-range", 1, max_bytes]],
            ExpiresIn=expires_in,
        )
        return form

    def head(self, upload_id: str) -> UploadHead | None:
        try:
            head = self._client.head_object(Bucket=self._bucket, Key=self._key(upload_id))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return UploadHead(size_bytes=int(head["ContentLength"]), etag=str(head["ETag"]))

    def read(self, upload_id: str, etag: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key(upload_id), IfMatch=etag)
        except ClientError as exc:
            if _missing(exc) or exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}:
                raise UploadChanged(upload_id) from exc
            raise
        body: bytes = response["Body"].read()
        return body

    def delete(self, upload_id: str) -> None:
        self._client.delete_object(Bucket=self._bucket, Key=self._key(upload_id))


class DynamoContextTable:
    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    def get(self, context_id: str) -> ContextRecord | None:
        item = self._table.get(CONTEXT_KIND, context_id)
        return ContextRecord.model_validate(item) if item else None

    def list_for_tenant(self, limit: int, before: str | None) -> list[ListedContext]:
        items = query_index(self._table, LIST_INDEX, LIST_KEY, self._table.scope.tenant.id, limit, before)
        return [ListedContext(str(item[LIST_POSITION]), ContextRecord.model_validate(item)) for item in items]

    def _item(self, record: ContextRecord, ttl: int) -> dict[str, Any]:
        """The record, its TTL, and its place in the list index (from the write that creates it)."""
        return {
            **record.model_dump(),
            "ttl": ttl,
            **list_attributes(self._table, position(record.created_at, record.context_id)),
        }

    def create(self, record: ContextRecord, ttl: int) -> None:
        try:
            self._table.put(
                CONTEXT_KIND,
                record.context_id,
                self._item(record, ttl),
                condition="attribute_not_exists(pk)",
            )
        except ConditionFailed as exc:
            raise ContextExists(record.context_id) from exc

    def replace(self, record: ContextRecord, ttl: int, expected_version: int) -> None:
        try:
            self._table.put(
                CONTEXT_KIND,
                record.context_id,
                self._item(record, ttl),
                condition="version = :expected",
                values={":expected": expected_version},
            )
        except ConditionFailed as exc:
            raise ConcurrentUpdate(record.context_id) from exc

    def delete(self, context_id: str) -> bool:
        try:
            self._table.delete(CONTEXT_KIND, context_id, condition="attribute_exists(pk)")
        except ConditionFailed:
            return False
        return True

    def record_upload_used(self, upload_id: str, context_id: str, ttl: int) -> None:
        self._table.put(USED_UPLOAD_KIND, upload_id, {"context_id": context_id, "ttl": ttl})

    def upload_used_for(self, upload_id: str) -> str | None:
        item = self._table.get(USED_UPLOAD_KIND, upload_id)
        return str(item["context_id"]) if item else None

    def take_upload_slot(self, hour: int, limit: int, ttl: int) -> bool:
        try:
            self._table.update(
                UPLOAD_BUDGET_KIND,
                str(hour),
                "ADD uploads :one SET #ttl = :ttl",
                condition="attribute_not_exists(uploads) OR uploads < :limit",
                names={"#ttl": "ttl"},
                values={":one": 1, ":limit": limit, ":ttl": ttl},
            )
        except ConditionFailed:
            return False
        return True


class DynamoBlobIndex:
    def __init__(self, table: ScopedTable) -> None:
        self._table = table

    def get_many(self, shas: Iterable[str]) -> dict[str, BlobInfo]:
        return {
            sha: BlobInfo.model_validate(item) for sha, item in self._table.get_many(BLOB_KIND, shas).items()
        }

    def put(self, info: BlobInfo, ttl: int) -> None:
        self._table.put(BLOB_KIND, info.sha256, {**info.model_dump(), "ttl": ttl})

    def forget(self, sha256: str) -> None:
        self._table.delete(BLOB_KIND, sha256)

    def put_many(self, entries: Iterable[tuple[BlobInfo, int]]) -> None:
        self._table.put_many(
            BLOB_KIND, {info.sha256: {**info.model_dump(), "ttl": ttl} for info, ttl in entries}
        )
