"""A directory as a context: what is read (and what is skipped, and why), what the last sync left
in the local manifest, and the plan for this sync (nothing, a PATCH of what changed, or a new
context sent directly or through a presigned upload). No I/O against the server here: both
clients run the same plan."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pathspec

from spool.errors import SyncError

# What a synchronous Lambda invocation accepts (6 MiB, the event as serialized: the body escaped
# inside it), less room for the rest of the event (headers, request context).
LAMBDA_PAYLOAD_BYTES = 6 * 1024 * 1024
EVENT_ROOM_BYTES = 64 * 1024
DIRECT_UPLOAD_LIMIT = LAMBDA_PAYLOAD_BYTES - EVENT_ROOM_BYTES
MAX_FILE_BYTES = 1_000_000
ALWAYS_IGNORED = [".git/", "__pycache__/", ".venv/"]
# Characters the server refuses in a path (spool_core.contexts.service: the client does not import
# the server's code): bidirectional controls, which show a name other than the one stored.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029\u200b\ufeff"
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Snapshot:
    """The uploadable text files of a directory, and the files left out with the reason."""

    root: Path
    files: dict[str, str]
    skipped: list[dict[str, str]]

    @property
    def hashes(self) -> dict[str, str]:
        return {path: sha256(content) for path, content in self.files.items()}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def snapshot(
    directory: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES, progress: Progress | None = None
) -> Snapshot:
    """Read ``directory``'s text files (honouring its .gitignore, leaving out VCS and cache folders);
    a binary, too large, non-UTF-8 or unreadable file, a link to a file outside the directory and a
    directory that cannot be listed are skipped and reported. Raises ``SyncError`` for a missing
    path, a file, or a directory with nothing to upload."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise SyncError(f"{root}: no such directory")
    if not root.is_dir():
        raise SyncError(f"{root}: not a directory (sync a directory, not a single file)")
    root = root.resolve()
    files: dict[str, str] = {}
    skipped: list[dict[str, str]] = []
    candidates = []
    forms: dict[str, str] = {}  # each name composed (NFC) -> the file's name as the disk has it
    for path, relative in _walk(root, skipped):
        if not _utf8(relative):  # the server could not even be told its name
            shown = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            skipped.append({"path": shown, "reason": "a name that is not UTF-8"})
            continue
        if not path.is_file():
            if path.is_symlink():  # named: it looks like a file in a listing of the directory
                skipped.append({"path": relative, "reason": "a link that leads to no file"})
            continue  # a socket or a pipe: not a file anyone wrote
        if not path.resolve().is_relative_to(root):  # a link out of the directory: never uploaded
            skipped.append({"path": relative, "reason": "a link to a file outside the directory"})
            continue
        if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in relative):
            # the server refuses such a path (it would show one name and hold another)
            skipped.append({"path": repr(relative), "reason": "a name with a control character"})
            continue
        composed = unicodedata.normalize("NFC", relative)
        if composed in forms:  # the server refuses the pair: the first (sorted) is kept, this one named
            skipped.append(
                {"path": relative, "reason": f"the name of {forms[composed]!r} in another Unicode form"}
            )
            continue
        forms[composed] = relative
        candidates.append((path, relative))
    for done, (path, relative) in enumerate(candidates, 1):
        reason = _read(path, max_file_bytes, files, relative)
        if reason is not None:
            skipped.append({"path": relative, "reason": reason})
        if progress is not None:
            progress("read", done, len(candidates))
    if not files:
        raise SyncError(_nothing_to_upload(root, skipped))
    return Snapshot(root, files, skipped)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes that were not UTF-8 (os.fsdecode's surrogates)
        return False
    return True


class _Ignores:
    """A tree's .gitignore files as git reads them: each one's patterns relative to its own directory,
    and a deeper one's decision over those above it (a ``!pattern`` there brings a file back)."""

    def __init__(self) -> None:
        self._always = pathspec.GitIgnoreSpec.from_lines(ALWAYS_IGNORED)  # whatever the files say
        self._specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []

    def read(self, directory: Path, prefix: str) -> None:
        """Add ``directory``'s own .gitignore, if it has one (``prefix``: its path under the root)."""
        try:
            lines = (directory / ".gitignore").read_text(errors="replace").splitlines()
        except OSError:  # none (or unreadable: git would not read it either)
            return
        self._specs.append((prefix, pathspec.GitIgnoreSpec.from_lines(lines)))

    def ignored(self, relative: str) -> bool:
        if self._always.match_file(relative):
            return True
        decision = False
        for prefix, spec in self._specs:  # from the root down: walked top-down, ancestors come first
            if relative.startswith(prefix):
                found = spec.check_file(relative[len(prefix) :]).include
                decision = decision if found is None else found
        return decision


def _walk(root: Path, skipped: list[dict[str, str]]) -> list[tuple[Path, str]]:
    """The files under ``root`` that no .gitignore on their way ignores, with their relative paths,
    sorted, without following linked directories or entering ignored ones; a directory that cannot
    be listed is reported as skipped, not left out silently."""

    def unlisted(error: OSError) -> None:
        relative = Path(error.filename).relative_to(root).as_posix() + "/"
        skipped.append({"path": relative, "reason": f"unreadable directory ({error.strerror})"})

    ignores = _Ignores()
    found: list[tuple[Path, str]] = []
    for directory, folders, names in os.walk(root, onerror=unlisted):
        base = Path(directory)
        prefix = base.relative_to(root).as_posix() + "/" if base != root else ""
        ignores.read(base, prefix)
        folders[:] = [f for f in folders if not ignores.ignored(f"{prefix}{f}/")]
        found.extend(
            (base / name, f"{prefix}{name}") for name in names if not ignores.ignored(f"{prefix}{name}")
        )
    return sorted(found)


def _read(path: Path, max_file_bytes: int, files: dict[str, str], relative: str) -> str | None:
    """Add the file's text to ``files``, or say why it is skipped."""
    try:
        if path.stat().st_size > max_file_bytes:
            return f"too large (over {max_file_bytes:,} bytes)"
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if b"\x00" in data[:8192]:
        return "binary"
    try:
        files[relative] = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    return None


def _nothing_to_upload(root: Path, skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return f"{root}: no files to upload (the directory is empty, or everything in it is ignored)"
    reasons: dict[str, int] = {}
    for entry in skipped:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    return f"{root}: no text files to upload; {len(skipped)} skipped ({why})"


def read_directory(root: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> dict[str, str]:
    """Text files under ``root`` by relative path (.gitignore'd, VCS folders and binaries left out)."""
    return snapshot(root, max_file_bytes=max_file_bytes).files


# ---------------------------------------------------------------------- the local manifest
def cache_dir() -> Path:
    return Path(os.environ.get("SPOOL_CACHE_DIR") or Path.home() / ".cache" / "spool")


def manifest_for(root: Path, base_url: str = "", api_key: str = "") -> Path:
    """Where the hashes of a directory's last upload to one server, for one key, are kept (outside
    the directory itself)."""
    identity = "\n".join([str(root), base_url, sha256(api_key)[:16] if api_key else ""])
    return cache_dir() / "contexts" / f"{sha256(identity)[:24]}.json"


def load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: a full upload rebuilds it
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def save_manifest(
    path: Path, base_url: str, context_id: str, hashes: dict[str, str], version: int | None = None
) -> None:
    """What was last sent: the context, the version that holds it (the next diff's ``If-Match``) and
    each file's hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    record = {"base_url": base_url, "context_id": context_id, "version": version, "files": hashes}
    temporary.write_text(json.dumps(record))
    temporary.replace(path)


# ---------------------------------------------------------------------- the plan
def serialized_size(body: bytes) -> int:
    """The body's size inside a Lambda event (a JSON string: quotes, backslashes, newlines and tabs
    take one more byte each), which is what the direct limit is about."""
    return len(body) + sum(body.count(c) for c in (b'"', b"\\", b"\n", b"\t"))


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class SyncPlan:
    """What this sync sends: ``none`` (nothing changed: confirm the context lives), ``patch`` (what
    changed) or ``create`` (a whole document, ``direct`` or ``presigned`` by its size)."""

    action: Literal["none", "patch", "create"]
    context_id: str | None = None
    body: bytes = b""
    via: Literal["direct", "presigned", "patch", "none"] = "direct"


def plan_create(snap: Snapshot, ttl_seconds: int, direct_limit: int = DIRECT_UPLOAD_LIMIT) -> SyncPlan:
    files = [{"path": path, "content": content} for path, content in snap.files.items()]
    body = encode({"files": files, "ttl_seconds": ttl_seconds})
    via: Literal["direct", "presigned"] = "direct" if serialized_size(body) <= direct_limit else "presigned"
    return SyncPlan("create", body=body, via=via)


def plan_sync(
    snap: Snapshot,
    manifest: dict[str, Any] | None,
    base_url: str,
    ttl_seconds: int,
    direct_limit: int = DIRECT_UPLOAD_LIMIT,
) -> SyncPlan:
    """The cheapest way to make the server's context match ``snap``."""
    if manifest is None or manifest.get("base_url") != base_url or not manifest.get("context_id"):
        return plan_create(snap, ttl_seconds, direct_limit)
    old: dict[str, str] = manifest["files"]
    hashes = snap.hashes
    upsert = [{"path": p, "content": snap.files[p]} for p, h in hashes.items() if old.get(p) != h]
    delete = [p for p in old if p not in hashes]
    context_id = str(manifest["context_id"])
    if not upsert and not delete:
        return SyncPlan("none", context_id=context_id, via="none")
    body = encode({"upsert": upsert, "delete": delete, "ttl_seconds": ttl_seconds})
    if serialized_size(body) > direct_limit:  # a PATCH has no upload form: send the whole anew
        return plan_create(snap, ttl_seconds, direct_limit)
    return SyncPlan("patch", context_id=context_id, body=body, via="patch")


__all__ = [
    "DIRECT_UPLOAD_LIMIT",
    "Snapshot",
    "SyncPlan",
    "load_manifest",
    "manifest_for",
    "plan_create",
    "plan_sync",
    "read_directory",
    "save_manifest",
    "serialized_size",
    "snapshot",
]
