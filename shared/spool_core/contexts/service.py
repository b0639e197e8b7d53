"""The context store's logic: validate, store content-addressed, version by manifest, expire.

Write order keeps every reference valid: blobs, then their index entries, then the manifest, then
the metadata item that points at it. A failure part-way leaves only unreferenced objects, which the
bucket's lifecycle rule reclaims; no metadata ever points at a missing blob.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from spool_core import tokens
from spool_core.chat import Message
from spool_core.clock import from_epoch, rfc3339
from spool_core.contexts.errors import (
    ContextConflict,
    ContextExpired,
    ContextFileMissing,
    ContextNotFound,
    DuplicatePath,
    InvalidContent,
    InvalidPath,
    ListingTooLarge,
    PathNotFound,
    TooManyFiles,
    TooManySymbols,
    UploadNotFound,
    refuse_empty_context_id,
)
from spool_core.contexts.model import (
    BlobInfo,
    ContextRecord,
    CreateContextRequest,
    FileEntry,
    FileIn,
    Manifest,
    PatchContextRequest,
    SymbolIn,
)
from spool_core.contexts.ports import (
    BlobIndex,
    BlobStore,
    ConcurrentUpdate,
    ContextExists,
    ContextTable,
    ManifestStore,
    UploadChanged,
    UploadHead,
    UploadStore,
)
from spool_core.errors import (
    DependencyUnavailable,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    SpoolError,
)
from spool_core.ids import new_id, plausible
from spool_core.limits.errors import RateLimited
from spool_core.listing import DEFAULT_LIMIT, CursorCodec, Page, check_limit
from spool_core.metadata import check as check_metadata
from spool_core.metadata import size as metadata_size
from spool_core.models import ModelSpec
from spool_core.observability import logger
from spool_core.prompt import (
    CONTEXT_PREAMBLE,
    CONTEXT_ROLE,
    FILE_CLOSE,
    context_text,
    file_open,
    symbols_block,
)
from spool_core.tenancy import Tenant

DAY = 86_400.0
# Bidirectional controls show a name other than the one stored; line and paragraph separators start a
# line of their own; a zero-width space or BOM makes two names that look alike.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029\u200b\ufeff"
)
TOO_LARGE_SUGGESTIONS = [
    "Leave out files the model does not need (PATCH with 'delete' drops them)",
    "Split the material into several contexts, one per job's need",
    "Ask the operator for a larger SPOOL_MAX_CONTEXT_BYTES",
]
# A refused document is deleted, not the upload: its URL takes a corrected document until it expires
# (the expires_at POST /v1/contexts/uploads answered), and the same upload_id then makes the context.
PUT_AGAIN = (
    "PUT a corrected document to the same upload_url while it is valid (until the upload's"
    " expires_at), then send the same upload_id again"
)
REFUSED = "it was deleted, and the upload takes a corrected one until its upload_url expires"
UPLOAD_ID_PREFIX = "upl"
PATCH_ATTEMPTS = 5  # a PATCH that lost its conditional write to a concurrent one applies again


class ContextLimits(NamedTuple):
    max_bytes: int = 50 * 1024 * 1024
    max_files: int = 2_000  # settings.max_context_files: one upload within the API's timeout
    max_symbols: int = 10_000  # what a model finds its way by; max_listing_bytes holds the GET's size
    # GET /v1/contexts/{id} answers files, symbols and metadata whole, in one Lambda response (at most
    # 6 MB, 6,291,456 bytes, as the invocation's JSON); the rest of it (the summary, its times, the
    # headers) is a few hundred bytes, so 5 MiB of listing leaves a margin of most of a megabyte.
    max_listing_bytes: int = 5 * 1024 * 1024
    blob_retention_seconds: float = 9 * DAY  # the bucket's lifecycle expiry of context objects
    upload_url_seconds: int = 900
    uploads_per_hour: int = 100  # presigned uploads a tenant may open (an object each, until used)
    workers: int = 16  # S3 and tiktoken calls in flight (I/O-bound on AWS)

    @property
    def max_document_bytes(self) -> int:
        """The most an uploaded document may hold: a context at the limit, written as JSON (escaped
        newlines, quotes and backslashes: source code's JSON runs 1.05-1.5x its size)."""
        return 2 * self.max_bytes


@dataclass
class StoreStats:
    """What one write did: the benchmark and the logs report it."""

    files: int = 0
    blobs_written: int = 0
    blobs_reused: int = 0
    blobs_refreshed: int = 0
    files_tokenized: int = 0
    bytes_tokenized: int = 0


@dataclass(frozen=True)
class _Prepared:
    path: str
    sha256: str
    size_bytes: int
    content: str = field(repr=False)

    def listed(self) -> dict[str, Any]:
        return _listed(self.path, self.sha256, self.size_bytes)


def _listed(path: str, sha256: str, size_bytes: int) -> dict[str, Any]:
    """A file as GET lists it (``FileEntry``), with its token count taken as its size in bytes: a token
    is at least one byte, so the count is never under the real one, and it is known before the
    content is tokenized (a refusal costs no tokenizing and writes nothing). Kept files are counted
    the same way, so that an update's growth is measured on one scale."""
    return {"path": path, "sha256": sha256, "size_bytes": size_bytes, "token_count": size_bytes}


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json_response's json.dumps, built once, not per call


def _carried(value: Any) -> int:
    """Bytes of ``value`` in Lambda's response: written as ``json_response`` writes a body (compact,
    ASCII), then carried as a JSON string in the invocation's answer, where each quote and backslash
    is escaped once more."""
    text = _COMPACT.encode(value)
    return len(text) + text.count('"') + text.count("\\")


class _Listing(NamedTuple):
    """The bytes of GET's ``"files":[...],"symbols":[...],"metadata":{...}`` in Lambda's response,
    counted one entry at a time (no copy of the whole listing is built) and by part, for the error."""

    files: int
    symbols: int
    metadata: int

    @property
    def total(self) -> int:
        return self.files + self.symbols + self.metadata

    @classmethod
    def of(
        cls, files: Sequence[Mapping[str, Any]], symbols: Sequence[SymbolIn], metadata: Mapping[str, Any]
    ) -> _Listing:
        def members(name: str, items: Iterable[Any]) -> int:
            counted = [_carried(item) for item in items]  # each entry, then "name":[ , , ] around them
            return _carried(name) + len(":[]") + sum(counted) + max(len(counted) - 1, 0)

        return cls(
            files=members("files", files),
            symbols=members("symbols", (s.model_dump(exclude_none=True) for s in symbols)) + len(","),
            metadata=_carried("metadata") + len(":") + _carried(metadata) + len(","),
        )


class LoadedContext(NamedTuple):
    record: ContextRecord
    manifest: Manifest


def validate_path(path: str) -> None:
    reason = None
    if not path:
        reason = "is empty"
    elif "\x00" in path:
        reason = "contains a NUL character"
    elif any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in path):
        # a newline starts a line of its own in a listing; a bidi control shows a name other than
        # the one stored (the "Trojan Source" trick)
        reason = "contains a control or bidirectional-override character"
    elif path.startswith("/"):
        reason = "starts with '/'; paths are relative"
    elif "\\" in path:
        reason = "contains '\\'; use '/' as the separator"
    elif any(segment in {"", ".", ".."} for segment in path.split("/")):
        reason = "has an empty, '.' or '..' segment"
    if reason:
        raise InvalidPath(f"Invalid path {path!r}: it {reason}", details={"path": path, "reason": reason})


def check_clashes(new: Iterable[str], paths: Collection[str]) -> None:
    """``new`` paths against every path of the version they go into: one name in two Unicode forms
    (macOS writes ``café`` decomposed, most tools composed) or a file that is also a folder is two
    files no disk holds, and both were sent to the model. Paths stored before are not checked again.
    Sorted and bisected: every prefix of every path, as sets, cost seconds for deep paths."""
    added = sorted({unicodedata.normalize("NFC", path): path for path in new}.items())
    if not added:
        return
    forms: dict[str, list[str]] = {}
    for path in paths:
        forms.setdefault(unicodedata.normalize("NFC", path), []).append(path)
    for composed, path in added:
        twin = next((other for other in forms.get(composed, []) if other != path), None)
        if twin is not None:
            raise DuplicatePath(
                f"Paths {path!r} and {twin!r} are one name written in two Unicode forms",
                details={"paths": sorted([path, twin])},
                suggestions=["Send each name in one Unicode form (NFC, as most tools write it)"],
            )
    everything = sorted(forms)
    added_names = [composed for composed, _ in added]
    for composed, path in added:  # a new path that is the folder of another
        at = bisect.bisect_left(everything, composed + "/")
        if at < len(everything) and everything[at].startswith(composed + "/"):
            inside = forms[everything[at]][0]
            _folder_clash(path, inside)
    for composed in everything:  # a file that is the folder of a new path
        at = bisect.bisect_left(added_names, composed + "/")
        if at < len(added) and added_names[at].startswith(composed + "/"):
            _folder_clash(forms[composed][0], added[at][1])


def _folder_clash(path: str, inside: str) -> None:
    reason = f"is a file and also the folder of {inside!r}"
    raise InvalidPath(f"Invalid path {path!r}: it {reason}", details={"path": path, "reason": reason})


class ContextService:
    def __init__(
        self,
        table: ContextTable,
        manifests: ManifestStore,
        blobs: BlobStore,
        index: BlobIndex,
        uploads: UploadStore,
        limits: ContextLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self._manifests = manifests
        self._blobs = blobs
        self._index = index
        self._uploads = uploads
        self.limits = limits or ContextLimits()
        self._clock = clock
        self.last_stats = StoreStats()

    # ------------------------------------------------------------------ reads
    def load(self, context_id: str) -> LoadedContext:
        record = self._record(context_id)
        return LoadedContext(record, self._manifests.get(record.manifest_key))

    def load_version(self, context_id: str, manifest_key: str) -> Manifest:
        """The version of the context a job was accepted with (``Job.context_manifest``), whatever
        happened to the context since (a PATCH, its expiry): its manifest and blobs outlive it (the
        bucket's lifecycle keeps them for days). Gone only when the context was deleted."""
        manifest = self._manifests.find(manifest_key)
        if manifest is None or manifest.context_id != context_id:
            raise ContextNotFound(
                f"Context '{context_id}' was deleted while the job used it",
                details={"context_id": context_id},
                suggestions=["Create the context again and send a new job with its context_id"],
            )
        return manifest

    def get(self, context_id: str) -> dict[str, Any]:
        loaded = self.load(context_id)
        record, manifest = loaded.record, loaded.manifest
        return {
            **self._summary(record),
            "files": [entry.model_dump() for entry in manifest.files],
            "symbols": [s.model_dump(exclude_none=True) for s in manifest.symbols],
            "metadata": manifest.metadata,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
        }

    def list_contexts(
        self, tenant: Tenant, cursors: CursorCodec, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None
    ) -> Page:
        """``GET /v1/contexts``: the tenant's contexts newest first, without their file lists (one
        Query a page, ``limit`` + 1 items: the extra one says whether a next page exists). Expired
        contexts are listed (``expired: true``) for as long as they answer 410."""
        check_limit(limit)
        before = cursors.decode(cursor, tenant, "contexts", "") if cursor else None
        listed = self._table.list_for_tenant(limit + 1, before)
        page = listed[:limit]
        now = self._clock()
        return Page(
            data=[entry.record.listed(rfc3339(from_epoch(entry.record.expires_at)), now) for entry in page],
            next_cursor=(
                cursors.encode(tenant, "contexts", "", page[-1].position) if len(listed) > limit else None
            ),
        )

    def read_file(self, entry: FileEntry, context_id: str) -> str:
        """A file's content; ``context_file_missing`` (for good, not retried) when its blob is gone,
        which the index then forgets, so that uploading the content again stores it again."""
        try:
            return self._blobs.get(entry.sha256).decode("utf-8")
        except KeyError:
            try:
                self._index.forget(entry.sha256)
            except Exception:  # the job still fails as it should; a forgotten blob only heals sooner
                logger.warning(
                    "could not forget a missing blob", exc_info=True, extra={"sha256": entry.sha256}
                )
            raise ContextFileMissing(
                f"File {entry.path!r} of context '{context_id}' is no longer stored",
                details={"context_id": context_id, "path": entry.path, "sha256": entry.sha256},
            ) from None

    def _record(self, context_id: str) -> ContextRecord:
        record = self._table.get(context_id) if plausible(context_id) else None
        if record is None:
            raise ContextNotFound(f"Context '{context_id}' not found", details={"context_id": context_id})
        return self._live(record)

    def _live(self, record: ContextRecord) -> ContextRecord:
        """The record, or ``context_expired`` (410) once its time is up."""
        if self._clock() >= record.expires_at:
            expired_at = rfc3339(from_epoch(record.expires_at))
            raise ContextExpired(
                f"Context '{record.context_id}' expired at {expired_at}",
                details={"context_id": record.context_id, "expired_at": expired_at},
            )
        return record

    # ------------------------------------------------------------------ writes
    def create(self, request: CreateContextRequest) -> dict[str, Any]:
        if request.upload_id is not None:
            return self.create_from_upload(request.upload_id)
        return self._create(request, new_id("ctx"))

    def _create(self, request: CreateContextRequest, context_id: str) -> dict[str, Any]:
        prepared = self._prepare(request.files)
        check_clashes([p.path for p in prepared], [p.path for p in prepared])
        self._check_symbols(request.symbols)
        self._check_limits(
            len(prepared),
            sum(p.size_bytes for p in prepared)
            + _symbols_bytes(request.symbols)
            + metadata_size(request.metadata),
        )
        self._check_listing(_Listing.of([p.listed() for p in prepared], request.symbols, request.metadata))
        now = self._clock()
        expires_at = now + request.ttl_seconds
        entries = self._store(prepared, tokens.DEFAULT_ENCODING, expires_at, {})
        manifest = Manifest(
            context_id=context_id,
            version=1,
            encoding=tokens.DEFAULT_ENCODING,
            files=entries,
            symbols=request.symbols,
            metadata=request.metadata,
        )
        record = self._record_for(manifest, created=now, updated=now, expires_at=expires_at)
        self._table.create(record, self._ttl(expires_at))
        return self._summary(record)

    def patch(
        self, context_id: str, request: PatchContextRequest, *, if_version: int | None = None
    ) -> dict[str, Any]:
        """Apply the diff to the current version. A concurrent PATCH that landed first makes it apply
        again to the version that one made (a diff of other files merges; one that no longer fits,
        say a delete of a file already deleted, says so), up to ``PATCH_ATTEMPTS`` times; then 409.

        ``if_version`` (the request's ``If-Match``): apply only to that version, never to another;
        409 naming the current one otherwise, so that of two clients editing one version exactly one
        wins and the other reads what changed before it sends its diff again."""
        if if_version is not None:
            return self._patch_once(context_id, request, if_version)
        for _ in range(PATCH_ATTEMPTS - 1):
            with contextlib.suppress(ContextConflict):
                return self._patch_once(context_id, request)
        return self._patch_once(context_id, request)  # the last attempt's conflict is the answer

    def _patch_once(
        self, context_id: str, request: PatchContextRequest, if_version: int | None = None
    ) -> dict[str, Any]:
        loaded = self.load(context_id)
        record, manifest = loaded.record, loaded.manifest
        if if_version is not None and record.version != if_version:
            raise self._not_that_version(context_id, if_version, record.version)
        current = {entry.path: entry for entry in manifest.files}
        upserts = self._prepare(request.upsert)
        self._check_patch_paths(current, upserts, request.delete)
        deleted = set(request.delete)
        after = (set(current) - deleted) | {p.path for p in upserts}
        check_clashes([p.path for p in upserts if p.path not in current], after)
        changed = [p for p in upserts if p.path not in current or current[p.path].sha256 != p.sha256]
        changed_paths = {p.path for p in changed}
        kept = {path: e for path, e in current.items() if path not in deleted and path not in changed_paths}
        metadata = (
            check_metadata(_merge_patch(manifest.metadata, request.metadata))
            if request.metadata is not None
            else manifest.metadata
        )
        # New symbols are checked; kept ones are as they were stored (under rules that may have been
        # looser), and a PATCH that does not grow the context is never refused for its size: a context
        # stored before a limit changed must stay editable, and deletable down to it.
        if request.symbols is not None:
            self._check_symbols(request.symbols)
        symbols = request.symbols if request.symbols is not None else manifest.symbols
        symbols = [s for s in symbols if s.path not in deleted]
        size = sum(e.size_bytes for e in kept.values()) + sum(p.size_bytes for p in changed)
        size += _symbols_bytes(symbols) + metadata_size(metadata)
        before = sum(e.size_bytes for e in manifest.files) + _symbols_bytes(manifest.symbols)
        before += metadata_size(manifest.metadata)
        self._check_limits(len(kept) + len(changed), size, before=(len(manifest.files), before))
        listed = [
            *(_listed(e.path, e.sha256, e.size_bytes) for e in kept.values()),
            *(p.listed() for p in changed),
        ]
        self._check_listing(
            _Listing.of(listed, symbols, metadata),
            before=lambda: _Listing.of(
                [_listed(e.path, e.sha256, e.size_bytes) for e in manifest.files],
                manifest.symbols,
                manifest.metadata,
            ),
        )

        now = self._clock()
        expires_at = now + request.ttl_seconds if request.ttl_seconds is not None else record.expires_at
        stored = self._store(changed, manifest.encoding, expires_at, kept)
        merged = {**kept, **{e.path: e for e in stored}}
        ordered = [merged[path] for path in sorted(merged)]

        new_manifest = Manifest(
            context_id=context_id,
            version=record.version + 1,
            encoding=manifest.encoding,
            files=ordered,
            symbols=symbols,
            metadata=metadata,
        )
        new_record = self._record_for(new_manifest, created=None, updated=now, expires_at=expires_at)
        new_record = new_record.model_copy(update={"created_at": record.created_at})
        try:
            self._table.replace(new_record, self._ttl(expires_at), expected_version=record.version)
        except ConcurrentUpdate:
            if if_version is not None:
                now_at = self._table.get(context_id)
                now_version = now_at.version if now_at else None
                raise self._not_that_version(context_id, if_version, now_version) from None
            raise ContextConflict(
                f"Context '{context_id}' changed while this update was applied",
                details={"context_id": context_id, "expected_version": record.version},
            ) from None
        return self._summary(new_record)

    @staticmethod
    def _not_that_version(context_id: str, expected: int, current: int | None) -> ContextConflict:
        return ContextConflict(
            f"Context '{context_id}' is at version {current}, not {expected} (If-Match): nothing was changed",
            details={"context_id": context_id, "expected_version": expected, "current_version": current},
            suggestions=[
                f"Read the context (GET /v1/contexts/{context_id}), apply your change to version"
                f' {current}, and send it with If-Match: "{current}"',
            ],
        )

    def delete(self, context_id: str) -> None:
        self._record(context_id)  # 404 / 410 as for every use
        if not self._table.delete(context_id):
            raise ContextNotFound(f"Context '{context_id}' not found", details={"context_id": context_id})
        self._manifests.delete_all(context_id)

    # ------------------------------------------------------------------ presigned uploads
    def begin_upload(self) -> dict[str, Any]:
        """A presigned PUT (the contract's ``upload_url``) and a presigned form POST that the bucket
        itself holds to ``max_bytes``; either way the document is checked again when it is used.
        Each tenant may open ``uploads_per_hour`` of them (all at once, then at that pace)."""
        self._spend_upload_budget()
        upload_id = new_id(UPLOAD_ID_PREFIX)
        expires = self._clock() + self.limits.upload_url_seconds
        seconds = self.limits.upload_url_seconds
        return {
            "upload_id": upload_id,
            "upload_url": self._uploads.presign_put(upload_id, seconds),
            "upload_form": self._uploads.presign_post(upload_id, seconds, self.limits.max_document_bytes),
            "expires_at": rfc3339(from_epoch(expires)),
            "max_bytes": self.limits.max_document_bytes,
        }

    def _spend_upload_budget(self) -> None:
        """One atomic conditional increment of the tenant's counter for the current hour."""
        now = self._clock()
        hour = int(now // 3600)
        if not self._table.take_upload_slot(hour, self.limits.uploads_per_hour, ttl=(hour + 2) * 3600):
            raise RateLimited(
                f"This tenant has opened {self.limits.uploads_per_hour} uploads this hour",
                retry_after_seconds=(hour + 1) * 3600 - now,
                details={"limit": self.limits.uploads_per_hour, "window": "hour"},
                suggestions=[
                    "Use the uploads you have (each is valid for 15 minutes), or retry after Retry-After",
                    "Send contexts under 6 MB directly with POST /v1/contexts",
                ],
            )

    def create_from_upload(self, upload_id: str) -> dict[str, Any]:
        """One context per upload: its id is derived from the upload's, so a retry (or a second
        request naming the same upload) answers the context already made, also while another request
        is making it. The document read is exactly the one whose size was checked (by ETag); a refused
        one is deleted at once, and the upload's URL takes a corrected one until it expires."""
        context_id = _context_of_upload(upload_id)
        if not _is_upload_id(upload_id):
            raise self._no_upload(upload_id)
        made = self._made_from_upload(upload_id, context_id)
        if made is not None:
            return made
        head = self._uploads.head(upload_id)
        if head is None:
            made = self._made_from_upload(upload_id, context_id)  # its maker deleted the document since
            if made is not None:
                return made
            raise self._no_upload(upload_id)
        try:
            document = self._uploaded_document(upload_id, head)
            summary = self._create(document, context_id)
        except UploadChanged:
            made = self._made_from_upload(upload_id, context_id)  # its maker deleted the document since
            if made is not None:
                return made
            # Not deleted: the document now stored is the one the client means, and a retry reads it.
            raise ContextConflict(
                f"Upload '{upload_id}' was replaced while it was read",
                details={"upload_id": upload_id},
                suggestions=["Send the same request again: it reads the document now stored"],
            ) from None
        except ContextExists:  # another request made it from this upload meanwhile: the same answer
            summary = self._summary(self._record(context_id))
        except SpoolError as refused:
            if not isinstance(refused, DependencyUnavailable | InternalError):  # a 5xx may be retried
                # The document is refused for good and deleted; the upload is not: its URL takes a
                # corrected document, which the same upload_id makes the context of.
                self._uploads.delete(upload_id)
                refused.suggestions = [*refused.suggestions, PUT_AGAIN]
            raise
        self._note_used(upload_id, context_id)
        self._uploads.delete(upload_id)
        return summary

    def _made_from_upload(self, upload_id: str, context_id: str) -> dict[str, Any] | None:
        """The context the upload made (its summary), ``upload_not_found`` if that context was deleted
        since, or None when it made none yet.

        The note is read before the context: its maker writes them in the other order (the context,
        then the note), so a note read first means the context was made before the read that follows,
        and missing from that read only because it was deleted. Read the other way round, a request
        that made the context between the two reads looked like one whose context was deleted."""
        noted = self._table.upload_used_for(upload_id)
        record = self._table.get(context_id)
        if record is not None:
            if noted is None:  # its maker has not noted it yet (or failed to): a deletion must see it
                self._note_used(upload_id, context_id)
            self._uploads.delete(upload_id)  # a second PUT to a used URL leaves nothing behind
            return self._summary(self._live(record))  # expired since: 410, as every use of it
        if noted is not None:
            self._uploads.delete(upload_id)  # its context was deleted: never made again, from anything
            raise UploadNotFound(
                f"Upload '{upload_id}' is used up: it made context '{context_id}', which was deleted",
                details={"upload_id": upload_id, "context_id": context_id},
            )
        return None

    def _note_used(self, upload_id: str, context_id: str) -> None:
        """Its URL may still take a PUT: once the context is deleted, the upload must not make it again."""
        used_until = self._clock() + self.limits.upload_url_seconds + DAY
        self._table.record_upload_used(upload_id, context_id, int(used_until))

    @staticmethod
    def _no_upload(upload_id: str) -> UploadNotFound:
        return UploadNotFound(
            f"Upload '{upload_id}' holds no document: none was PUT to its upload_url yet, the upload"
            " expired, its document was refused (and deleted), or it is another tenant's",
            details={"upload_id": upload_id},
            suggestions=[
                f"If its document was refused: {PUT_AGAIN}",
                *UploadNotFound.default_suggestions,
            ],
        )

    def _uploaded_document(self, upload_id: str, head: UploadHead) -> CreateContextRequest:
        """The document ``head`` described, refused when it is too large or not a context document;
        ``UploadChanged`` when the object is no longer that one."""
        if head.size_bytes > self.limits.max_document_bytes:
            raise PayloadTooLarge(
                f"The uploaded document is {head.size_bytes:,} bytes; an upload holds at most"
                f" {self.limits.max_document_bytes:,} (a context's limit is {self.limits.max_bytes:,})",
                details={
                    "size_bytes": head.size_bytes,
                    "limit_bytes": self.limits.max_document_bytes,
                    "context_limit_bytes": self.limits.max_bytes,
                },
                suggestions=TOO_LARGE_SUGGESTIONS,
            )
        if head.size_bytes == 0:  # a PUT with no body, or one a client sent as a form
            raise InvalidRequest(
                f"The uploaded document is empty (0 bytes); {REFUSED}",
                details={
                    "upload_id": upload_id,
                    "size_bytes": 0,
                    "fields": [{"field": "upload", "message": "empty", "type": "missing"}],
                },
                suggestions=[
                    "PUT the JSON document itself as the request body, with Content-Type: application/json"
                    " (curl: --upload-file document.json, or --data-binary @document.json with that header)"
                ],
            )
        try:
            document = CreateContextRequest.model_validate_json(self._uploads.read(upload_id, head.etag))
        except ValidationError as exc:
            fields = [
                {
                    "field": ".".join(("upload", *(str(p) for p in e["loc"]))),
                    "message": e["msg"],
                    "type": e["type"],
                }
                for e in exc.errors()
            ]
            raise InvalidRequest(
                f"The uploaded document is not a valid context document; {REFUSED}",
                details={"upload_id": upload_id, "fields": fields},
                suggestions=["Fix the fields named in details"],
            ) from None
        if document.upload_id is not None:
            raise InvalidRequest(
                f"An uploaded document cannot name another upload; {REFUSED}",
                details={
                    "upload_id": upload_id,
                    "fields": [{"field": "upload.upload_id", "message": "not allowed in a document"}],
                },
                suggestions=["Fix the fields named in details"],
            )
        return document

    # ------------------------------------------------------------------ token counting
    def prompt_tokens(self, loaded: LoadedContext, encoding: str) -> int:
        """Tokens of the context as the prompt lays it out: its own message (the role's and the
        message's tokens, the preamble), files with their paths, then symbols."""
        manifest = loaded.manifest
        per_file = self._content_tokens(manifest, encoding)
        framing = tokens.count_messages([{"role": CONTEXT_ROLE, "content": CONTEXT_PREAMBLE}], encoding)
        framing -= tokens.TOKENS_PER_REPLY  # counted once, with the request's messages
        framing += sum(tokens.count(file_open(e.path), encoding) for e in manifest.files)
        framing += len(manifest.files) * tokens.count(FILE_CLOSE, encoding)
        symbols = tokens.count(_symbols_text(manifest.symbols), encoding)
        return sum(per_file) + framing + symbols

    @staticmethod
    def joining_bound(manifest: Manifest) -> int:
        """How far ``prompt_tokens`` may be above the joined text's count: a file's tokens counted on
        their own merge with the tags around it, a token at each of its edges as code ends and starts
        (a reviewer found three for a file that starts with a blank line and ends in a bare ``\r``;
        and, for rare endings such as ``};\r\n``, one fewer: the joined text is then the larger)."""
        return 4 * len(manifest.files) + 2

    def exact_prompt_tokens(self, manifest: Manifest, encoding: str) -> int:
        """``prompt_tokens`` of the joined text the worker sends (every file read from S3)."""
        message = {"role": CONTEXT_ROLE, "content": self.rendered(manifest)}
        return tokens.count_messages([message], encoding) - tokens.TOKENS_PER_REPLY

    def rendered(self, manifest: Manifest) -> str:
        """The context's message as the model is sent it: its files, read at once, with their paths."""
        with ThreadPoolExecutor(self.limits.workers) as pool:
            contents = list(pool.map(lambda e: self.read_file(e, manifest.context_id), manifest.files))
        paths = [entry.path for entry in manifest.files]
        return context_text(zip(paths, contents, strict=True), (s.model_dump() for s in manifest.symbols))

    def count_tokens(
        self, model: ModelSpec, context_id: str | None, messages: Sequence[Message]
    ) -> dict[str, Any]:
        refuse_empty_context_id(context_id)
        family = tokens.family_tokenizer(model.family)
        context_tokens = 0
        if context_id:
            context_tokens = self.prompt_tokens(self.load(context_id), family.encoding)
            if not messages:  # the reply's tokens, which the messages' count would otherwise hold
                context_tokens += tokens.TOKENS_PER_REPLY
        message_tokens = tokens.count_messages((m.model_dump() for m in messages), family.encoding)
        context_tokens = tokens.calibrate(context_tokens, family.calibration)
        message_tokens = tokens.calibrate(message_tokens, family.calibration)
        return {
            "input_tokens": context_tokens + message_tokens,
            "context_tokens": context_tokens,
            "message_tokens": message_tokens,
            "context_window": model.context_window,
            "max_output_tokens": model.max_output_tokens,
        }

    def _content_tokens(self, manifest: Manifest, encoding: str) -> list[int]:
        if encoding == manifest.encoding:
            return [e.token_count for e in manifest.files]
        infos = self._index.get_many({e.sha256 for e in manifest.files})
        missing = {e.sha256 for e in manifest.files if encoding not in infos.get(e.sha256, _NO_INFO).tokens}
        if missing:
            entries = {e.sha256: e for e in manifest.files}

            def tokenize(sha: str) -> tuple[str, int]:  # a blob gone is context_file_missing, not a 500
                return sha, tokens.count(self.read_file(entries[sha], manifest.context_id), encoding)

            with ThreadPoolExecutor(self.limits.workers) as pool:
                counted = dict(pool.map(tokenize, missing))
            for sha, count in counted.items():
                info = infos.get(sha)
                if info is not None:
                    info.tokens[encoding] = count
                    self._index.put(info, self._ttl_of_blob(info))
                infos.setdefault(
                    sha, BlobInfo(sha256=sha, size_bytes=0, stored_at=0, tokens={encoding: count})
                )
                infos[sha].tokens[encoding] = count
        return [infos[e.sha256].tokens[encoding] for e in manifest.files]

    # ------------------------------------------------------------------ internals
    def _prepare(self, files: Iterable[FileIn]) -> list[_Prepared]:
        files = list(files)
        if len(files) > self.limits.max_files:
            raise TooManyFiles(
                f"{len(files):,} files is more than the limit of {self.limits.max_files:,}",
                details={"file_count": len(files), "limit": self.limits.max_files},
            )
        seen: set[str] = set()
        duplicates: list[str] = []
        prepared = []
        for file in files:
            validate_path(file.path)
            if file.path in seen:
                duplicates.append(file.path)
            seen.add(file.path)
            if "\x00" in file.content:
                raise InvalidContent(
                    f"File {file.path!r} contains NUL characters (binary content)",
                    details={"path": file.path, "reason": "contains NUL characters"},
                )
            try:
                data = file.content.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidContent(
                    f"File {file.path!r} is not valid UTF-8 text",
                    details={"path": file.path, "reason": "not valid UTF-8"},
                ) from None
            prepared.append(_Prepared(file.path, hashlib.sha256(data).hexdigest(), len(data), file.content))
            del data
        if duplicates:
            raise DuplicatePath(
                f"Paths appear more than once: {', '.join(sorted(set(duplicates)))}",
                details={"paths": sorted(set(duplicates))},
            )
        return prepared

    def _check_symbols(self, symbols: Sequence[SymbolIn]) -> None:
        """New symbols: as many as the limit, each path a valid one (their size in the prompt counts
        toward the context's, ``_symbols_bytes``)."""
        if len(symbols) > self.limits.max_symbols:
            raise TooManySymbols(
                f"{len(symbols):,} symbols is more than the limit of {self.limits.max_symbols:,}",
                details={"symbol_count": len(symbols), "limit": self.limits.max_symbols},
            )
        for symbol in symbols:
            if symbol.path is not None:
                validate_path(symbol.path)

    def _check_limits(
        self, file_count: int, size_bytes: int, *, before: tuple[int, int] | None = None
    ) -> None:
        """The file count and size of a context against the limits; with ``before`` (an update's
        count and size of the version it changes), only growth past a limit is refused."""
        more_files = before is None or file_count > before[0]
        larger = before is None or size_bytes > before[1]
        if more_files and file_count > self.limits.max_files:
            raise TooManyFiles(
                f"{file_count:,} files is more than the limit of {self.limits.max_files:,}",
                details={"file_count": file_count, "limit": self.limits.max_files},
            )
        if larger and size_bytes > self.limits.max_bytes:
            raise PayloadTooLarge(
                f"Context size {size_bytes:,} bytes exceeds the limit of {self.limits.max_bytes:,}",
                details={"size_bytes": size_bytes, "limit_bytes": self.limits.max_bytes},
                # the limit is the context's, however it is sent: an upload or a PATCH does not help
                suggestions=TOO_LARGE_SUGGESTIONS,
            )

    def _check_listing(self, listing: _Listing, *, before: Callable[[], _Listing] | None = None) -> None:
        """What GET /v1/contexts/{id} would answer against ``max_listing_bytes``; with ``before`` (the
        version an update changes, counted only for a listing over the limit: a PATCH within it does
        not serialize the whole stored listing a second time), only growth past the limit is refused,
        as for the other limits."""
        if listing.total <= self.limits.max_listing_bytes or (before and listing.total <= before().total):
            return
        raise ListingTooLarge(
            f"The context's files, symbols and metadata would take {listing.total:,} bytes in the answer"
            f" of GET /v1/contexts/{{id}}; it holds at most {self.limits.max_listing_bytes:,}",
            details={
                "listing_bytes": listing.total,
                "limit_bytes": self.limits.max_listing_bytes,
                "files_bytes": listing.files,
                "symbols_bytes": listing.symbols,
                "metadata_bytes": listing.metadata,
            },
        )

    @staticmethod
    def _check_patch_paths(
        current: Mapping[str, FileEntry], upserts: Sequence[_Prepared], deletes: Sequence[str]
    ) -> None:
        for path in deletes:
            if path not in current:  # one the context holds is deleted whatever rules it was stored under
                validate_path(path)
        repeated = {p for p in deletes if deletes.count(p) > 1} | ({p.path for p in upserts} & set(deletes))
        if repeated:
            raise DuplicatePath(
                f"Paths named twice in one update: {', '.join(sorted(repeated))}",
                details={"paths": sorted(repeated)},
            )
        missing = sorted(set(deletes) - set(current))
        if missing:
            raise PathNotFound(
                f"Cannot delete paths the context does not hold: {', '.join(missing)}",
                details={"paths": missing},
            )

    def _store(
        self, prepared: Sequence[_Prepared], encoding: str, expires_at: float, kept: Mapping[str, FileEntry]
    ) -> list[FileEntry]:
        """Store new content once, count each distinct content once, and make sure every blob the
        version names (new or kept) outlives the context."""
        stats = StoreStats(files=len(prepared))
        unique = {p.sha256: p for p in prepared}
        kept_shas = {e.sha256 for e in kept.values()} - set(unique)
        known = self._index.get_many(set(unique) | kept_shas)

        def store(p: _Prepared) -> tuple[BlobInfo, str, bool]:
            """Make the blob of ``p`` exist and outlive the context; returns (info, action, tokenized)."""
            info = known.get(p.sha256)
            if info is not None and self._alive(info, expires_at):
                action = "reused"
            elif info is not None and self._blobs_refresh(info):
                info.stored_at = self._clock()
                action = "refreshed"
            else:  # new content, or an index entry whose blob is gone
                self._blobs.put(p.sha256, p.content.encode("utf-8"))
                previous = info.tokens if info else {}
                info = BlobInfo(
                    sha256=p.sha256, size_bytes=p.size_bytes, stored_at=self._clock(), tokens=previous
                )
                action = "written"
            tokenized = encoding not in info.tokens
            if tokenized:
                info.tokens[encoding] = tokens.count(p.content, encoding)
            return info, action, tokenized

        def keep_alive(sha: str) -> BlobInfo | None:
            """Kept files were stored before: refresh any that would expire before the context."""
            info = known.get(sha)
            if info is not None and self._alive(info, expires_at):
                return None
            if info is None or not self._blobs_refresh(info):
                raise ContextConflict("A file of this context is no longer stored", details={"sha256": sha})
            info.stored_at = self._clock()
            return info

        with ThreadPoolExecutor(self.limits.workers) as pool:
            results = dict(zip(unique, pool.map(store, unique.values()), strict=True))
            refreshed = [info for info in pool.map(keep_alive, kept_shas) if info is not None]
        changed = refreshed + [
            info for info, action, tokenized in results.values() if tokenized or action != "reused"
        ]
        # The index is written once every blob it describes exists, in batches.
        self._index.put_many((info, self._ttl_of_blob(info)) for info in changed)

        actions = [action for _, action, _ in results.values()]
        stats.blobs_written = actions.count("written")
        stats.blobs_reused = actions.count("reused")
        stats.blobs_refreshed = actions.count("refreshed") + len(refreshed)
        stats.files_tokenized = sum(1 for _, _, tokenized in results.values() if tokenized)
        stats.bytes_tokenized = sum(unique[sha].size_bytes for sha, (_, _, t) in results.items() if t)
        self.last_stats = stats
        return [
            FileEntry(
                path=p.path,
                sha256=p.sha256,
                size_bytes=p.size_bytes,
                token_count=results[p.sha256][0].tokens[encoding],
            )
            for p in prepared
        ]

    def _blobs_refresh(self, info: BlobInfo) -> bool:
        try:
            self._blobs.refresh(info.sha256)
        except KeyError:
            return False
        return True

    def _alive(self, info: BlobInfo, expires_at: float) -> bool:
        """Will the bucket keep this blob a day beyond ``expires_at``?"""
        return info.stored_at + self.limits.blob_retention_seconds >= expires_at + DAY

    def _ttl_of_blob(self, info: BlobInfo) -> int:
        return int(info.stored_at + self.limits.blob_retention_seconds)

    def _ttl(self, expires_at: float) -> int:
        """DynamoDB TTL of the metadata item: long after expiry, so reads keep answering 410 (not 404)
        while it lasts; TTL deletion itself is lazy."""
        return int(expires_at + 30 * DAY)

    def _record_for(
        self, manifest: Manifest, *, created: float | None, updated: float, expires_at: float
    ) -> ContextRecord:
        key = self._manifests.put(manifest)
        return ContextRecord(
            context_id=manifest.context_id,
            version=manifest.version,
            manifest_key=key,
            encoding=manifest.encoding,
            size_bytes=sum(e.size_bytes for e in manifest.files) + _symbols_bytes(manifest.symbols),
            token_count=sum(e.token_count for e in manifest.files)
            + tokens.count(_symbols_text(manifest.symbols), manifest.encoding),
            file_count=len(manifest.files),
            created_at=rfc3339(from_epoch(created if created is not None else updated)),
            updated_at=rfc3339(from_epoch(updated)),
            expires_at=expires_at,
        )

    def _summary(self, record: ContextRecord) -> dict[str, Any]:
        return record.summary(rfc3339(from_epoch(record.expires_at)))


_NO_INFO = BlobInfo(sha256="", size_bytes=0, stored_at=0)


def _symbols_text(symbols: Iterable[SymbolIn]) -> str:
    return symbols_block(s.model_dump() for s in symbols)


def _symbols_bytes(symbols: Iterable[SymbolIn]) -> int:
    return len(_symbols_text(symbols).encode("utf-8"))


def _context_of_upload(upload_id: str) -> str:
    """The context an upload becomes: ``ctx_`` and the upload's own random part."""
    return "ctx_" + upload_id.removeprefix(f"{UPLOAD_ID_PREFIX}_")


def _is_upload_id(value: str) -> bool:
    prefix, _, rest = value.partition("_")
    return prefix == UPLOAD_ID_PREFIX and len(rest) == 26 and rest.isalnum() and rest.islower()


def _merge_patch(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch at the top level: keys set to null are removed."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


__all__ = ["ContextLimits", "ContextService", "LoadedContext", "StoreStats", "validate_path"]
