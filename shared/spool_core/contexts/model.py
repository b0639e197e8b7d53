"""Contexts as the API sees them (payloads), as the domain sees them, and the manifest."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from spool_core.chat import Message
from spool_core.json_values import json_numbers
from spool_core.metadata import Metadata

MAX_TTL_SECONDS = 604_800
DEFAULT_TTL_SECONDS = 3600


# --------------------------------------------------------------------------- API payloads
class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=1024)
    content: str


class SymbolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    kind: str | None = Field(default=None, max_length=64)
    path: str | None = Field(default=None, max_length=1024)
    line: int | None = Field(default=None, ge=0)

    _numbers = json_numbers("line")


def _a_json_number(value: Any) -> Any:
    """A JSON number, as the contract says: ``true`` is not one second, nor ``"60"`` sixty."""
    if isinstance(value, bool | str):
        raise ValueError("must be a whole number of seconds (a JSON number, not a string or boolean)")
    return value


Seconds = Annotated[int, BeforeValidator(_a_json_number), Field(ge=1, le=MAX_TTL_SECONDS)]


class CreateContextRequest(BaseModel):
    """Either the document itself, or ``upload_id`` naming a document PUT to a presigned URL."""

    model_config = ConfigDict(extra="forbid")

    files: list[FileIn] = Field(default_factory=list)
    symbols: list[SymbolIn] = Field(default_factory=list)
    metadata: Metadata = Field(default_factory=dict)
    ttl_seconds: Seconds = DEFAULT_TTL_SECONDS
    upload_id: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _upload_alone(self) -> CreateContextRequest:
        if self.upload_id is not None and (
            self.files or self.symbols or self.metadata or "ttl_seconds" in self.model_fields_set
        ):
            raise ValueError(
                "upload_id is used alone: the uploaded document holds files, symbols, metadata and"
                " ttl_seconds"
            )
        return self


class PatchContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upsert: list[FileIn] = Field(default_factory=list)
    delete: list[str] = Field(default_factory=list)
    symbols: list[SymbolIn] | None = None
    metadata: Metadata | None = None  # a JSON merge patch (RFC 7386) of the current metadata
    ttl_seconds: Seconds | None = None


class TokenCountRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    context_id: str | None = Field(default=None, max_length=64)
    messages: list[Message] = Field(default_factory=list, max_length=1000)


# --------------------------------------------------------------------------- domain
class FileEntry(BaseModel):
    """One file of a context version; its content lives in the blob named by ``sha256``."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    size_bytes: int
    token_count: int


class Manifest(BaseModel):
    """One version of a context, stored as an S3 object next to the blobs it names."""

    context_id: str
    version: int
    encoding: str
    files: list[FileEntry]
    symbols: list[SymbolIn] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ContextRecord(BaseModel):
    """The metadata item: what a read needs before it touches S3."""

    context_id: str
    version: int
    manifest_key: str
    encoding: str
    size_bytes: int
    token_count: int
    file_count: int
    created_at: str
    updated_at: str
    expires_at: float  # epoch seconds

    def summary(self, expires_at: str) -> dict[str, Any]:
        return {
            "context_id": self.context_id,
            "version": self.version,
            "expires_at": expires_at,
            "size_bytes": self.size_bytes,
            "token_count": self.token_count,
            "file_count": self.file_count,
        }

    def listed(self, expires_at: str, now: float) -> dict[str, Any]:
        """A listing's entry: the summary and its times, without the file list (which lives in the
        manifest); ``expired`` contexts stay listed while they answer 410."""
        return {
            **self.summary(expires_at),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expired": now >= self.expires_at,
        }


# The context item's attributes a listing reads (the list index's projection in template.yaml).
SUMMARY_FIELDS: tuple[str, ...] = tuple(ContextRecord.model_fields)


class BlobInfo(BaseModel):
    """What Spool knows of one stored blob: size, when it was (re)written, token counts by encoding."""

    sha256: str
    size_bytes: int
    stored_at: float
    tokens: dict[str, int] = Field(default_factory=dict)
