"""The context store's logic with in-memory ports: validation, dedupe, versions, expiry, diffs."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from spool_core import tokens
from spool_core.api.resolver import json_response
from spool_core.chat import Message
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
)
from spool_core.contexts.model import CreateContextRequest, PatchContextRequest
from spool_core.contexts.service import DAY, PATCH_ATTEMPTS, ContextLimits, ContextService
from spool_core.errors import InvalidRequest, PayloadTooLarge
from spool_core.jobs.model import Job
from spool_core.jobs.runner import build_messages
from spool_core.limits.errors import RateLimited
from spool_core.models import registry
from spool_core.prompt import symbols_block
from tests.fakes import (
    MemoryBlobIndex,
    MemoryBlobStore,
    MemoryContextTable,
    MemoryManifestStore,
    MemoryUploadStore,
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **limits: Any) -> None:
        self.table = MemoryContextTable()
        self.manifests = MemoryManifestStore()
        self.blobs = MemoryBlobStore()
        self.index = MemoryBlobIndex()
        self.uploads = MemoryUploadStore()
        self.clock = Clock()
        self.service = ContextService(
            self.table,
            self.manifests,
            self.blobs,
            self.index,
            self.uploads,
            ContextLimits(**limits),
            self.clock,
        )

    def create(self, files: dict[str, str], **extra: Any) -> dict[str, Any]:
        request = CreateContextRequest.model_validate(
            {"files": [{"path": p, "content": c} for p, c in files.items()], **extra}
        )
        return self.service.create(request)

    def patch(self, context_id: str, **body: Any) -> dict[str, Any]:
        return self.service.patch(context_id, PatchContextRequest.model_validate(body))


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_create_stores_each_distinct_content_once_and_counts_tokens(h: Harness) -> None:
    summary = h.create({"a.py": "print('x')\n", "b.py": "print('x')\n", "c.md": "# title"}, ttl_seconds=60)
    assert summary["version"] == 1
    assert summary["file_count"] == 3
    assert summary["size_bytes"] == 11 + 11 + 7
    assert summary["context_id"].startswith("ctx_")
    assert len(h.blobs.objects) == 2
    assert summary["token_count"] == 2 * tokens.count("print('x')\n") + tokens.count("# title")
    assert summary["expires_at"] == "2027-01-15T08:01:00.000Z"
    detail = h.service.get(summary["context_id"])
    assert [f["path"] for f in detail["files"]] == ["a.py", "b.py", "c.md"]
    assert detail["files"][0]["sha256"] == detail["files"][1]["sha256"]
    assert detail["created_at"] == detail["updated_at"]


def test_identical_files_across_contexts_are_neither_stored_nor_tokenized_again(h: Harness) -> None:
    h.create({"a.py": "x = 1\n" * 100})
    assert h.service.last_stats.files_tokenized == 1
    h.create({"renamed.py": "x = 1\n" * 100})
    assert h.blobs.puts == 1
    assert h.service.last_stats.blobs_reused == 1
    assert h.service.last_stats.files_tokenized == 0


def test_symbols_count_toward_the_context_and_its_limits() -> None:
    """Symbols are sent with the files: their size and tokens are the context's, under its limits,
    and their paths follow the files' rules."""
    h = Harness(max_bytes=2_000, max_symbols=30)
    symbols = [{"name": f"f{i}", "kind": "function", "path": "a.py", "line": i} for i in range(20)]
    summary = h.create({"a.py": "x = 1\n"}, symbols=symbols)
    block = symbols_block(symbols)
    assert summary["size_bytes"] == 6 + len(block.encode())
    assert summary["token_count"] == tokens.count("x = 1\n") + tokens.count(block)
    with pytest.raises(TooManySymbols) as many:
        h.create({"a.py": "x"}, symbols=symbols * 2)
    assert many.value.details == {"symbol_count": 40, "limit": 30}
    with pytest.raises(PayloadTooLarge):  # 1 byte of files, the rest in symbols
        h.create({"a.py": "x"}, symbols=[{"name": "n" * 500, "path": "a.py"}] * 5)
    with pytest.raises(InvalidPath) as bad:
        h.create({"a.py": "x"}, symbols=[{"name": "f", "path": "../../etc/passwd"}])
    assert bad.value.details["path"] == "../../etc/passwd"
    with pytest.raises(PayloadTooLarge):
        h.patch(summary["context_id"], symbols=[{"name": "n" * 500, "path": "a.py"}] * 5)
    patched = h.patch(summary["context_id"], symbols=[])
    assert (patched["size_bytes"], patched["token_count"]) == (6, tokens.count("x = 1\n"))


def test_a_context_stored_under_looser_limits_stays_editable_down_to_them() -> None:
    """Limits lowered after a context was stored (or symbols counted since): a PATCH that does not
    grow it is never refused, so it can still be edited, and made to fit; growth is refused."""
    h = Harness()
    symbols = [{"name": f"f{i}", "path": "a.py"} for i in range(40)]
    context_id = h.create({"a.py": "x" * 500, "b.py": "y" * 500}, symbols=symbols)["context_id"]
    h.service.limits = ContextLimits(max_bytes=600, max_files=1, max_symbols=10)
    same_size = h.patch(context_id, upsert=[{"path": "a.py", "content": "z" * 500}])  # over every limit
    assert same_size["version"] == 2
    assert h.patch(context_id, delete=["b.py"])["file_count"] == 1  # smaller, still over in size
    with pytest.raises(PayloadTooLarge):
        h.patch(context_id, upsert=[{"path": "a.py", "content": "x" * 501}])  # grows
    with pytest.raises(TooManySymbols):  # new symbols are held to the rules
        h.patch(context_id, symbols=symbols)


# Files whose token count is their size (one character, one token), symbols and metadata whose
# JSON escapes quotes, backslashes, non-ASCII and a line separator: GET's listing of them is counted
# exactly, so its size is a boundary a test can stand on.
LISTED = {
    "files": [{"path": f"src/{i}/mod\u00e9.py", "content": "x"} for i in range(3)],
    "symbols": [
        {
            "name": 'say "hi" \\ caf\u00e9 \u2028 \U0001f600',
            "kind": "function",
            "path": "src/0/mod\u00e9.py",
            "line": 7,
        },
        {"name": "bare"},
    ],
    "metadata": {"repo": 'acme/"web"', "n": 1},
}


def create_listed(h: Harness) -> dict[str, Any]:
    return h.service.create(CreateContextRequest.model_validate(LISTED))


def listing_in_lambda_response(h: Harness, context_id: str) -> int:
    """The bytes GET's files, symbols and metadata take in Lambda's response, measured on the answer
    itself: the body as the function writes it, then as the invocation's JSON carries that string."""
    body = json_response(200, h.service.get(context_id)).body
    assert isinstance(body, str)
    listing = body[body.index(',"files":') + 1 : body.index(',"created_at":')]
    return len(json.dumps(listing)) - len('""')


def test_a_get_listing_one_byte_over_its_bound_is_refused_and_one_at_it_answers() -> None:
    at_bound = listing_in_lambda_response(h := Harness(), create_listed(h)["context_id"])
    h = Harness(max_listing_bytes=at_bound)
    created = create_listed(h)
    assert listing_in_lambda_response(h, created["context_id"]) == at_bound
    h = Harness(max_listing_bytes=at_bound - 1)
    with pytest.raises(ListingTooLarge) as refused:
        create_listed(h)
    details = refused.value.details
    assert (details["listing_bytes"], details["limit_bytes"]) == (at_bound, at_bound - 1)
    assert details["files_bytes"] + details["symbols_bytes"] + details["metadata_bytes"] == at_bound
    assert refused.value.suggestions and h.table.items == {} and h.blobs.objects == {}


def test_a_listing_bound_is_never_under_what_get_answers() -> None:
    """A file's token count is taken as its size (a token is at least a byte): larger files list
    fewer bytes than counted, never more."""
    h = Harness()
    context_id = h.create({"a.py": "def handler(event, context):\n    return event\n" * 40})["context_id"]
    answered = listing_in_lambda_response(h, context_id)
    with pytest.raises(ListingTooLarge) as refused:
        Harness(max_listing_bytes=answered).create(
            {"a.py": "def handler(event, context):\n    return event\n" * 40}
        )
    assert answered < refused.value.details["listing_bytes"] <= answered + 3


def test_a_patch_may_not_grow_a_listing_past_its_bound_but_may_shrink_one_over_it() -> None:
    at_bound = listing_in_lambda_response(h := Harness(), create_listed(h)["context_id"])
    h = Harness(max_listing_bytes=at_bound)
    context_id = create_listed(h)["context_id"]
    with pytest.raises(ListingTooLarge):
        h.patch(context_id, symbols=[*LISTED["symbols"], {"name": "one more"}])
    with pytest.raises(ListingTooLarge):
        h.patch(context_id, metadata={"more": True})
    assert h.patch(context_id, upsert=[{"path": LISTED["files"][0]["path"], "content": "y"}])["version"] == 2
    h.service.limits = h.service.limits._replace(max_listing_bytes=100)  # a context stored before the bound
    assert h.patch(context_id, delete=[LISTED["files"][1]["path"]])["file_count"] == 2
    with pytest.raises(ListingTooLarge):
        h.patch(context_id, upsert=[{"path": "new.py", "content": "z"}])


def test_ten_thousand_long_symbols_are_refused_before_anything_is_stored(h: Harness) -> None:
    """10,000 symbols of 512-character names on 1,000-character paths were accepted, and GET then
    answered 15.6 MB (Lambda's limit is 6 MB): refused now, before anything is tokenized or written."""
    path = "d/" * 500 + "f.py"
    symbols = [
        {"name": f"s{i:05d}_" + "x" * 500, "kind": "function", "path": path, "line": i} for i in range(10_000)
    ]
    with pytest.raises(ListingTooLarge) as refused:
        h.create({path: "def f(): pass\n"}, symbols=symbols)
    assert refused.value.details["symbols_bytes"] > 15_000_000
    assert refused.value.details["limit_bytes"] == 5 * 1024 * 1024 < 6_000_000
    assert h.table.items == {} and h.blobs.objects == {}


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs.py",
        "a/../b",
        "./a",
        "a//b",
        "a/",
        "a\\b",
        "nul\x00.py",
        "two\nlines.py",
        "evil\u202egnp.py",
        "tab\t.py",
    ],
)
def test_invalid_paths_are_rejected_before_anything_is_written(h: Harness, path: str) -> None:
    with pytest.raises(InvalidPath) as raised:
        h.create({"ok.py": "x", path: "y"})
    assert raised.value.details["path"] == path
    assert h.blobs.objects == {}
    assert h.table.items == {}


def test_duplicate_paths_are_named(h: Harness) -> None:
    request = CreateContextRequest.model_validate(
        {"files": [{"path": "a", "content": "1"}, {"path": "a", "content": "2"}]}
    )
    with pytest.raises(DuplicatePath) as raised:
        h.service.create(request)
    assert raised.value.details == {"paths": ["a"]}


def test_one_name_in_two_unicode_forms_is_one_path_twice(h: Harness) -> None:
    """``café.py`` composed (most tools) and decomposed (macOS) were two files that look alike, both
    kept and both sent to the model; an upsert of the other form added a file instead of replacing."""
    composed, decomposed = "caf\u00e9.py", "cafe\u0301.py"
    with pytest.raises(DuplicatePath) as raised:
        h.create({composed: "1", decomposed: "2"})
    assert raised.value.details == {"paths": sorted([composed, decomposed])}
    context_id = h.create({composed: "1"})["context_id"]
    with pytest.raises(DuplicatePath):
        h.patch(context_id, upsert=[{"path": decomposed, "content": "2"}])
    assert h.patch(context_id, upsert=[{"path": composed, "content": "2"}])["version"] == 2  # the same form


def test_a_file_that_is_also_a_folder_is_refused(h: Harness) -> None:
    """No disk holds ``a`` as a file and ``a/b`` beside it: a client writing the context back failed."""
    with pytest.raises(InvalidPath) as raised:
        h.create({"a": "file", "a/b": "child"})
    assert raised.value.details["path"] == "a" and "folder" in raised.value.details["reason"]
    context_id = h.create({"a": "file", "c/d": "x"})["context_id"]
    with pytest.raises(InvalidPath):
        h.patch(context_id, upsert=[{"path": "a/b", "content": "child"}])
    with pytest.raises(InvalidPath):
        h.patch(context_id, upsert=[{"path": "c", "content": "file"}])
    # a file replaced by a folder in one update is fine
    assert h.patch(context_id, upsert=[{"path": "a/b", "content": "child"}], delete=["a"])["file_count"] == 2


@pytest.mark.parametrize(("content", "reason"), [("bin\x00ary", "NUL"), ("lone \ud800 surrogate", "UTF-8")])
def test_binary_and_non_utf8_content_is_rejected(h: Harness, content: str, reason: str) -> None:
    with pytest.raises(InvalidContent) as raised:
        h.create({"f": content})
    assert reason in raised.value.details["reason"]
    assert h.blobs.objects == {}


def test_too_many_files_and_too_many_bytes() -> None:
    h = Harness(max_files=2, max_bytes=10)
    with pytest.raises(TooManyFiles) as many:
        h.create({"a": "1", "b": "2", "c": "3"})
    assert many.value.details == {"file_count": 3, "limit": 2}
    with pytest.raises(PayloadTooLarge) as large:
        h.create({"a": "123456", "b": "7890é"})
    assert large.value.details == {"size_bytes": 12, "limit_bytes": 10}
    assert not any("uploads" in s for s in large.value.suggestions)  # an upload has the same limit
    assert h.table.items == {}


def test_unknown_and_expired_contexts(h: Harness) -> None:
    with pytest.raises(ContextNotFound):
        h.service.get("ctx_missing")
    summary = h.create({"a": "1"}, ttl_seconds=10)
    h.clock.now += 10
    for use in (h.service.get, h.service.load, h.service.delete):
        with pytest.raises(ContextExpired) as expired:
            use(summary["context_id"])
        assert expired.value.details["expired_at"] == summary["expires_at"]
    with pytest.raises(ContextExpired):
        h.patch(summary["context_id"], ttl_seconds=100)


def test_the_metadata_item_outlives_expiry_so_reads_answer_410(h: Harness) -> None:
    summary = h.create({"a": "1"}, ttl_seconds=10)
    _, ttl = h.table.items[summary["context_id"]]
    assert ttl >= h.clock.now + 10 + 7 * DAY


def test_patch_sends_only_what_changed(h: Harness) -> None:
    files = {f"src/f{i}.py": f"value = {i}\n" * 50 for i in range(20)}
    summary = h.create(files, metadata={"repo": "acme", "drop": 1}, symbols=[{"name": "f", "path": "old.py"}])
    context_id = summary["context_id"]
    h.patch(context_id, upsert=[{"path": "old.py", "content": "legacy"}])
    puts_before = h.blobs.puts

    updated = h.patch(
        context_id,
        upsert=[
            {"path": "src/f3.py", "content": "changed\n"},
            {"path": "src/f4.py", "content": files["src/f4.py"]},
        ],
        delete=["old.py"],
        metadata={"team": "core", "drop": None},
    )
    assert updated["version"] == 3
    assert updated["file_count"] == 20
    assert h.blobs.puts == puts_before + 1  # only the changed file
    assert h.service.last_stats.files_tokenized == 1
    detail = h.service.get(context_id)
    assert detail["metadata"] == {"repo": "acme", "team": "core"}
    assert detail["symbols"] == []  # symbols of deleted paths go with them
    by_path = {f["path"]: f for f in detail["files"]}
    assert by_path["src/f3.py"]["token_count"] == tokens.count("changed\n")
    assert "old.py" not in by_path
    assert updated["size_bytes"] == sum(f["size_bytes"] for f in detail["files"])


def test_patch_errors(h: Harness) -> None:
    context_id = h.create({"a": "1", "b": "2"})["context_id"]
    with pytest.raises(PathNotFound) as missing:
        h.patch(context_id, delete=["nope", "a"])
    assert missing.value.details == {"paths": ["nope"]}
    with pytest.raises(DuplicatePath):
        h.patch(context_id, upsert=[{"path": "a", "content": "3"}], delete=["a"])
    with pytest.raises(InvalidPath):
        h.patch(context_id, delete=["../a"])
    with pytest.raises(ContextNotFound):
        h.patch("ctx_other", delete=["a"])
    assert h.service.get(context_id)["version"] == 1


def test_patch_extends_the_ttl_and_keeps_blobs_alive(h: Harness) -> None:
    context_id = h.create({"a": "1"}, ttl_seconds=int(7 * DAY))["context_id"]
    h.clock.now += 5 * DAY  # the blob was stored 5 days ago; retention is 9 days
    h.patch(context_id, ttl_seconds=7 * DAY)
    assert h.blobs.refreshes == 1  # otherwise the lifecycle rule would delete it before the context expires
    (info,) = h.index.items.values()
    assert info.stored_at == h.clock.now


def test_a_patch_that_loses_to_a_concurrent_one_applies_again_and_then_is_a_conflict(h: Harness) -> None:
    """Never a lost write: a PATCH whose conditional write lost to a concurrent one applies its diff
    to the version that one made; one that keeps losing gets 409 (nothing it sent is lost either)."""
    context_id = h.create({"a": "1"})["context_id"]
    h.table.before_replace.append(context_id)  # another PATCH lands first (version 2)
    patched = h.patch(context_id, upsert=[{"path": "b", "content": "2"}])
    assert patched["version"] == 3
    assert {f["path"] for f in h.service.get(context_id)["files"]} == {"a", "b"}
    h.table.before_replace.extend([context_id] * PATCH_ATTEMPTS)
    with pytest.raises(ContextConflict) as conflict:
        h.patch(context_id, upsert=[{"path": "c", "content": "3"}])
    assert conflict.value.details["expected_version"] == 3 + PATCH_ATTEMPTS - 1


def test_a_patch_with_if_match_never_applies_to_another_version(h: Harness) -> None:
    """One that loses its conditional write to a concurrent PATCH is a 409 at once (applied again to
    the newer version, it would write over the other client's edit)."""
    context_id = h.create({"a": "1"})["context_id"]
    h.table.before_replace.append(context_id)  # another PATCH of version 1 lands first
    with pytest.raises(ContextConflict) as lost:
        h.service.patch(
            context_id, PatchContextRequest(upsert=[{"path": "a", "content": "mine"}]), if_version=1
        )
    assert lost.value.details == {"context_id": context_id, "expected_version": 1, "current_version": 2}
    assert h.service.get(context_id)["version"] == 2  # the other one's, and nothing of this one
    with pytest.raises(ContextConflict):  # a stale version is refused before anything is stored
        h.service.patch(context_id, PatchContextRequest(delete=["a"]), if_version=1)
    assert h.service.patch(context_id, PatchContextRequest(delete=["a"]), if_version=2)["version"] == 3


def test_delete_removes_the_context_and_its_manifests(h: Harness) -> None:
    context_id = h.create({"a": "1"})["context_id"]
    h.service.delete(context_id)
    assert h.manifests.objects == {}
    with pytest.raises(ContextNotFound):
        h.service.delete(context_id)


def test_uploads_create_a_context_once(h: Harness) -> None:
    ticket = h.service.begin_upload()
    assert ticket["max_bytes"] == h.service.limits.max_document_bytes
    document = {"files": [{"path": "big.txt", "content": "hello"}], "metadata": {"via": "upload"}}
    h.uploads.objects[ticket["upload_id"]] = json.dumps(document).encode()
    summary = h.service.create(CreateContextRequest(upload_id=ticket["upload_id"]))
    assert summary["file_count"] == 1
    assert h.uploads.objects == {}  # consumed
    assert set(ticket["upload_form"]) == {"url", "fields"}  # the size-limited form POST
    # the same upload again (a retry, or a second PUT to the used URL): the same context, nothing kept
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "other.txt", "content": "x"}]}'
    assert h.service.create_from_upload(ticket["upload_id"]) == summary
    assert h.uploads.objects == {}
    assert len(h.table.items) == 1
    with pytest.raises(UploadNotFound):
        h.service.create_from_upload("../../t/other/blobs/x")
    with pytest.raises(UploadNotFound):
        h.service.create_from_upload(h.service.begin_upload()["upload_id"])  # never uploaded


def test_an_upload_whose_context_was_deleted_never_makes_it_again(h: Harness) -> None:
    """Its URL still takes a PUT for a while: finishing it again must not bring the deleted id back
    with other content (an id clients and jobs knew would name different data)."""
    ticket = h.service.begin_upload()
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "a.txt", "content": "first"}]}'
    context_id = h.service.create_from_upload(ticket["upload_id"])["context_id"]
    h.service.delete(context_id)
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "b.txt", "content": "second"}]}'
    with pytest.raises(UploadNotFound) as used:
        h.service.create_from_upload(ticket["upload_id"])
    assert "used up" in used.value.message and used.value.details["context_id"] == context_id
    assert h.table.items == {} and h.uploads.objects == {}
    with pytest.raises(ContextNotFound):
        h.service.get(context_id)


def test_an_upload_named_again_after_its_context_expired_is_a_410(h: Harness) -> None:
    """A retry naming the upload answered the context already made, even once it had expired (201
    with an ``expires_at`` in the past); an expired context answers 410 for every use."""
    ticket = h.service.begin_upload()
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "a", "content": "x"}], "ttl_seconds": 60}'
    summary = h.service.create_from_upload(ticket["upload_id"])
    h.clock.now += 61
    with pytest.raises(ContextExpired) as expired:
        h.service.create_from_upload(ticket["upload_id"])
    assert expired.value.details["context_id"] == summary["context_id"]


def test_an_upload_replaced_after_its_check_is_not_read() -> None:
    h = Harness(max_bytes=100)
    upload_id = h.service.begin_upload()["upload_id"]
    h.uploads.objects[upload_id] = b'{"files": [{"path": "a", "content": "small"}]}'
    h.uploads.replace_before_read[upload_id] = b'{"files": [{"path": "a", "content": "' + b"x" * 500 + b'"}]}'
    with pytest.raises(ContextConflict) as conflict:
        h.service.create_from_upload(upload_id)
    assert h.table.items == {} and h.blobs.objects == {}
    # The document now stored is kept, so that the retry the conflict suggests reads it.
    assert "again" in conflict.value.suggestions[0] and len(h.uploads.objects[upload_id]) > 200
    with pytest.raises(PayloadTooLarge):
        h.service.create_from_upload(upload_id)


def test_invalid_and_oversized_uploads() -> None:
    h = Harness(max_bytes=100)
    ticket = h.service.begin_upload()
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "a"}]}'
    with pytest.raises(InvalidRequest) as invalid:
        h.service.create_from_upload(ticket["upload_id"])
    assert invalid.value.details["fields"][0]["field"] == "upload.files.0.content"
    assert h.uploads.objects == {}  # a refused document is deleted at once
    assert "used up" not in invalid.value.message and "takes a corrected one" in invalid.value.message
    assert "same upload_url" in invalid.value.suggestions[-1]
    h.uploads.objects[ticket["upload_id"]] = b"x" * 201
    with pytest.raises(PayloadTooLarge) as large:
        h.service.create_from_upload(ticket["upload_id"])
    assert large.value.details == {"size_bytes": 201, "limit_bytes": 200, "context_limit_bytes": 100}
    assert not any("/v1/contexts/uploads" in s for s in large.value.suggestions)  # the caller just did
    assert h.uploads.objects == {}
    h.uploads.objects[ticket["upload_id"]] = b""  # a PUT with no body: not blamed on the JSON
    with pytest.raises(InvalidRequest) as empty:
        h.service.create_from_upload(ticket["upload_id"])
    assert "empty (0 bytes)" in empty.value.message and empty.value.details["size_bytes"] == 0
    assert "PUT the JSON document itself" in empty.value.suggestions[0]
    assert "same upload_url" in empty.value.suggestions[-1] and h.uploads.objects == {}
    h.uploads.objects[ticket["upload_id"]] = b'{"files": [{"path": "../x", "content": "y"}]}'
    with pytest.raises(InvalidPath):
        h.service.create_from_upload(ticket["upload_id"])
    assert h.uploads.objects == {} and h.table.items == {}


def test_a_refused_upload_takes_a_corrected_document_as_its_answers_say() -> None:
    """A refused document is deleted; the upload is not used up: its URL, valid until it expires,
    takes a corrected document, and the same upload_id makes the context from it. Every answer on
    the way says so (they used to say the upload was used up, and sent the client to a new one)."""
    h = Harness()
    upload_id = h.service.begin_upload()["upload_id"]
    for refused in (b"garbage", b'{"files": [{"path": "../x", "content": "y"}]}', b'{"ttl_seconds": 0}'):
        h.uploads.objects[upload_id] = refused
        with pytest.raises(InvalidRequest) as error:
            h.service.create_from_upload(upload_id)
        assert "used up" not in error.value.message and "a new upload" not in str(error.value.suggestions)
        assert "PUT a corrected document to the same upload_url" in error.value.suggestions[-1]
        with pytest.raises(UploadNotFound) as missing:  # sent again before the corrected PUT
            h.service.create_from_upload(upload_id)
        assert "refused" in missing.value.message and "used up" not in missing.value.message
        assert missing.value.suggestions[0].startswith("If its document was refused: PUT a corrected")
    h.uploads.objects[upload_id] = b'{"files": [{"path": "ok", "content": "fine"}]}'
    assert h.service.create_from_upload(upload_id)["file_count"] == 1


def test_a_context_at_the_limit_fits_an_upload_though_its_json_is_larger() -> None:
    """The limit is the context's: a document at it is larger (JSON's quotes and escapes), and fits."""
    h = Harness(max_bytes=100)
    ticket = h.service.begin_upload()
    assert ticket["max_bytes"] == 200  # what the upload may hold
    document = json.dumps({"files": [{"path": "q", "content": "a\n" * 49 + "b"}]}).encode()
    assert len(document) > 100
    h.uploads.objects[ticket["upload_id"]] = document
    assert h.service.create_from_upload(ticket["upload_id"])["size_bytes"] == 99


@pytest.mark.parametrize(
    "extra", [{"files": [{"path": "a", "content": "b"}]}, {"ttl_seconds": 5}, {"metadata": {"a": 1}}]
)
def test_upload_id_cannot_be_mixed_with_a_document(extra: dict[str, Any]) -> None:
    """Dropped, it would be a setting the caller thinks took effect (the document holds it)."""
    with pytest.raises(ValueError, match="upload_id is used alone"):
        CreateContextRequest.model_validate({"upload_id": "upl_x", **extra})


def job_fields() -> dict[str, Any]:
    return {
        "job_id": "job_abc",
        "tenant_id": "t",
        "status": "queued",
        "fingerprint": "f",
        "model_requested": "sim-fast",
        "model_resolved": "sim-fast",
        "created_at": "2026-12-06T00:00:00.000Z",
    }


def test_token_count_lays_the_context_out_as_the_prompt_does(h: Harness) -> None:
    context_id = h.create(
        {"src/a.py": "def f():\n    return 1\n"},
        symbols=[{"name": "f", "kind": "function", "path": "src/a.py", "line": 1}],
    )["context_id"]
    model = registry().resolve("sim-fast")
    question = Message(role="user", content="Explain f")
    counted = h.service.count_tokens(model, context_id, [question])
    job = Job.model_validate(
        {**job_fields(), "request": {"context_id": context_id, "messages": [question.model_dump()]}}
    )
    sent = build_messages(lambda: h.service, job)  # what the worker sends, and the simulator bills
    billed = tokens.count_messages(m.model_dump() for m in sent)
    # each file counted on its own (a token or two over the joined text), never under
    assert 0 <= counted["input_tokens"] - billed <= 2, (counted, billed)
    assert counted["message_tokens"] == tokens.count_messages([question.model_dump()])
    assert counted["input_tokens"] == counted["context_tokens"] + counted["message_tokens"]
    assert counted["context_window"] == 128_000
    empty = h.create({})["context_id"]  # no files: still a message of its own, with the preamble
    request = {"context_id": empty, "messages": [question.model_dump()]}
    job = Job.model_validate({**job_fields(), "request": request})
    billed = tokens.count_messages(m.model_dump() for m in build_messages(lambda: h.service, job))
    assert h.service.count_tokens(model, empty, [question])["input_tokens"] == billed
    alone = h.service.count_tokens(model, empty, [])["input_tokens"]  # the context alone, as sent alone
    assert alone == tokens.count_messages(m.model_dump() for m in build_messages(lambda: h.service, job)[:1])


def test_an_empty_context_id_is_refused_by_the_count_as_by_admission(h: Harness) -> None:
    model = registry().resolve("sim-fast")
    with pytest.raises(InvalidRequest) as refused:
        h.service.count_tokens(model, "", [Message(role="user", content="hi")])
    assert refused.value.details["param"] == "context_id"


def test_other_encodings_are_counted_once_and_cached(h: Harness) -> None:
    context_id = h.create({"a.txt": "héllo wörld " * 50})["context_id"]
    loaded = h.service.load(context_id)
    o200k = h.service.prompt_tokens(loaded, tokens.O200K)
    (info,) = h.index.items.values()
    assert info.tokens[tokens.O200K] == tokens.count("héllo wörld " * 50, tokens.O200K)
    assert h.service.prompt_tokens(loaded, tokens.O200K) == o200k
    gone = h.create({"b.txt": "never counted in o200k"})["context_id"]
    (sha,) = [e.sha256 for e in h.service.load(gone).manifest.files]
    del h.blobs.objects[sha]  # a blob the bucket lost: said as such, never a bare KeyError (a 500)
    with pytest.raises(ContextFileMissing):
        h.service.prompt_tokens(h.service.load(gone), tokens.O200K)


def test_each_tenant_may_open_so_many_uploads_an_hour() -> None:
    h = Harness(uploads_per_hour=3)
    h.clock.now = 1_800_000_000.0 + 600  # ten minutes into an hour
    for _ in range(3):
        h.service.begin_upload()
    with pytest.raises(RateLimited) as refused:
        h.service.begin_upload()
    assert refused.value.retry_after_seconds == pytest.approx(3000)  # the next hour
    assert refused.value.headers["Retry-After"] == "3000"
    h.clock.now += 3000
    h.service.begin_upload()


def test_a_lost_race_to_make_a_context_from_one_upload_answers_the_winners_context() -> None:
    h = Harness()
    upload_id = h.service.begin_upload()["upload_id"]
    h.uploads.objects[upload_id] = b'{"files": [{"path": "a.txt", "content": "mine"}]}'
    create = h.table.create

    def another_request_first(record: Any, ttl: int) -> None:
        theirs = record.model_copy(update={"size_bytes": 99})  # the other request's record lands first
        h.table.create = create  # type: ignore[method-assign]
        create(theirs, ttl)
        create(record, ttl)  # raises ContextExists, as DynamoDB's conditional put would

    h.table.create = another_request_first  # type: ignore[method-assign]
    summary = h.service.create_from_upload(upload_id)
    assert summary["size_bytes"] == 99  # the stored context, not a 500
    assert h.uploads.objects == {}


class Interleaving:
    """Two requests naming one upload, interleaved at one chosen point: just before the first
    request's ``at``-th call to a wrapped port, the second runs on its own thread to its end."""

    def __init__(self, at: int, meanwhile: Callable[[], Any]) -> None:
        self.at = at
        self.calls = 0
        self.meanwhile = meanwhile
        self.answer: Any = None
        self.ran = False

    def wrap(self, port: Any) -> Any:
        interleaving = self

        class Paused:
            def __getattr__(self, name: str) -> Any:
                method = getattr(port, name)

                def call(*args: Any, **kwargs: Any) -> Any:
                    interleaving.step()
                    return method(*args, **kwargs)

                return call

        return Paused()

    def step(self) -> None:
        if self.calls == self.at:
            self.run()
        self.calls += 1

    def run(self) -> None:
        def other() -> None:
            try:
                self.answer = self.meanwhile()
            except Exception as exc:
                self.answer = exc

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.ran = True


@pytest.mark.parametrize("at", range(8))
def test_a_retry_of_an_upload_answers_the_context_another_made_while_it_read(at: int) -> None:
    """At every point of one request, another naming the same upload may make the context, note the
    upload used and delete its document; each answers that context. The upload_not_found "which was
    deleted" (the context made between the check of the context and the check of the note), the
    upload_not_found "not found" (the document deleted before the head) and the conflict (deleted
    before the read) were answers of such a retry."""
    h = Harness()
    upload_id = h.service.begin_upload()["upload_id"]
    h.uploads.objects[upload_id] = b'{"files": [{"path": "a.txt", "content": "once"}]}'
    interleaving = Interleaving(at, lambda: h.service.create_from_upload(upload_id))
    retry = ContextService(
        interleaving.wrap(h.table),
        h.manifests,
        h.blobs,
        h.index,
        interleaving.wrap(h.uploads),
        h.service.limits,
        h.clock,
    )
    answer = retry.create_from_upload(upload_id)
    if not interleaving.ran:  # this request finished first: the other one comes after it
        interleaving.run()
    assert interleaving.answer == answer
    assert answer["context_id"] in h.table.items and len(h.table.items) == 1
    assert h.uploads.objects == {}
    assert h.table.upload_used_for(upload_id) == answer["context_id"]


def test_a_retry_notes_the_upload_its_maker_did_not_note() -> None:
    """The maker of a context failed after its create, before its note: the retry that answers the
    context notes the upload used, so that deleting the context does not let the upload make it again."""
    h = Harness()
    upload_id = h.service.begin_upload()["upload_id"]
    h.uploads.objects[upload_id] = b'{"files": [{"path": "a.txt", "content": "first"}]}'
    record_upload_used = h.table.record_upload_used

    def fails_once(*args: Any) -> None:
        h.table.record_upload_used = record_upload_used  # type: ignore[method-assign]
        raise ConnectionError("DynamoDB did not answer")

    h.table.record_upload_used = fails_once  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        h.service.create_from_upload(upload_id)
    context_id = h.service.create_from_upload(upload_id)["context_id"]  # the client's retry
    h.service.delete(context_id)
    h.uploads.objects[upload_id] = b'{"files": [{"path": "b.txt", "content": "second"}]}'
    with pytest.raises(UploadNotFound):
        h.service.create_from_upload(upload_id)
    assert h.table.items == {}


def test_two_writers_of_one_version_never_share_a_manifest_object() -> None:
    """Two PATCHes (or two creates from one upload) racing for the same version each write their
    own manifest; the record that wins its conditional write names its own, never the loser's."""
    h = Harness()
    context_id = h.create({"a.txt": "one"})["context_id"]
    loaded = h.service.load(context_id)
    theirs = loaded.manifest.model_copy(update={"version": 2, "metadata": {"by": "them"}})
    ours = loaded.manifest.model_copy(update={"version": 2, "metadata": {"by": "us"}})
    their_key, our_key = h.manifests.put(theirs), h.manifests.put(ours)
    assert their_key != our_key
    assert h.manifests.get(their_key).metadata == {"by": "them"}


@pytest.mark.parametrize("ttl", [True, "60", 60.5])
def test_ttl_seconds_must_be_a_json_integer(ttl: Any) -> None:
    """``true`` used to be read as a one-second context, ``"60"`` as 60."""
    from pydantic import ValidationError

    from spool_core.contexts.model import CreateContextRequest, PatchContextRequest

    with pytest.raises(ValidationError):
        CreateContextRequest.model_validate({"files": [{"path": "a", "content": "x"}], "ttl_seconds": ttl})
    with pytest.raises(ValidationError):
        PatchContextRequest.model_validate({"ttl_seconds": ttl})
    assert CreateContextRequest.model_validate({"files": [{"path": "a", "content": "x"}], "ttl_seconds": 60})
