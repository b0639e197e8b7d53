"""The contexts' domain errors (their statuses come from the one mapping in spool_core.api)."""

from __future__ import annotations

from typing import ClassVar

from spool_core.errors import Conflict, Gone, InvalidRequest, NotFound


def refuse_empty_context_id(context_id: str | None) -> None:
    """An empty ``context_id`` is a client's missing value, not "no context": counted or run without
    the context it meant, the answer would change."""
    if context_id == "":
        message = "context_id is empty"
        raise InvalidRequest(
            f"The request does not match the schema: context_id ({message})",
            details={"param": "context_id", "fields": [{"field": "context_id", "message": message}]},
            suggestions=["Send the context_id that POST /v1/contexts returned, or leave context_id out"],
        )


class ContextNotFound(NotFound):
    code = "context_not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Check the context_id; create a context with POST /v1/contexts",
    )


class ContextExpired(Gone):
    code = "context_expired"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Upload the context again with POST /v1/contexts",
        "Set a longer ttl_seconds (up to 604800) when creating or updating a context",
    )


class ContextFileMissing(Gone):
    code = "context_file_missing"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Create the context again (POST /v1/contexts stores the missing content again) and send a new"
        " job with its context_id",
    )


class InvalidPath(InvalidRequest):
    code = "invalid_path"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Use relative '/'-separated paths without '..', a leading '/', or NUL characters",
    )


class DuplicatePath(InvalidRequest):
    code = "duplicate_path"
    default_suggestions: ClassVar[tuple[str, ...]] = ("Send each path once",)


class InvalidContent(InvalidRequest):
    code = "invalid_content"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Send text files only (valid UTF-8, no NUL characters); skip binaries",
    )


class TooManyFiles(InvalidRequest):
    code = "too_many_files"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Split the context, or leave out generated and vendored files (the CLI honours .gitignore)",
        "The limit keeps one upload inside the API's 29 s timeout; an operator can raise"
        " SPOOL_MAX_CONTEXT_FILES where uploads are fast enough",
    )


class TooManySymbols(InvalidRequest):
    code = "too_many_symbols"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Send the symbols a model needs to find its way (definitions), not every reference",
    )


class ListingTooLarge(InvalidRequest):
    code = "listing_too_large"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Send fewer symbols (the definitions a model needs to find its way), with shorter names",
        "Split the context into several, one per job's need",
    )


class PathNotFound(InvalidRequest):
    code = "path_not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Delete only paths the context holds; GET /v1/contexts/{id} lists them",
    )


class UploadNotFound(NotFound):
    code = "upload_not_found"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Create an upload with POST /v1/contexts/uploads, PUT the document to its upload_url,"
        " then send its upload_id",
    )


class ContextConflict(Conflict):
    code = "context_conflict"
    default_suggestions: ClassVar[tuple[str, ...]] = (
        "Another update landed first; read the context again and retry",
    )
