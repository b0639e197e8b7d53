"""Provide tiktoken's encoding files offline, verified, in the layout tiktoken's cache expects.

tiktoken looks in ``TIKTOKEN_CACHE_DIR`` for a file named by the SHA-1 of the encoding's URL and
accepts it only if its SHA-256 matches the hash it expects. This script fills that directory:
first by tiktoken's own source URL, and where that host is unreachable, from the litellm wheel on
PyPI, which ships the same files already named by tiktoken's cache key. Every file is checked
against the published SHA-256 before it is written; nothing here is ever committed.

Usage: python scripts/fetch_encodings.py DEST_DIR
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The wheel that carries the files; pinned so the fallback is reproducible (the hashes are checked anyway).
LITELLM_REQUIREMENT = "litellm==1.110.2"
LITELLM_TOKENIZER_DIR = "litellm/litellm_core_utils/tokenizers/"


@dataclass(frozen=True)
class Encoding:
    name: str
    url: str
    sha256: str

    @property
    def cache_key(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()  # noqa: S324 - tiktoken's own cache key


# URLs and hashes exactly as tiktoken_ext/openai_public.py declares them.
ENCODINGS = (
    Encoding(
        "cl100k_base",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    Encoding(
        "o200k_base",
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
)


def _valid(data: bytes, encoding: Encoding) -> bool:
    return hashlib.sha256(data).hexdigest() == encoding.sha256


def _write_atomically(dest: Path, data: bytes) -> None:
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _from_source(encoding: Encoding) -> bytes | None:
    try:
        with urllib.request.urlopen(encoding.url, timeout=10) as response:  # noqa: S310 - fixed https URL
            data: bytes = response.read()
    except OSError as exc:
        print(f"  {encoding.name}: tiktoken's source is unreachable ({exc.__class__.__name__})")
        return None
    return data if _valid(data, encoding) else None


def _from_litellm_wheel(missing: list[Encoding]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"  downloading {LITELLM_REQUIREMENT} (wheel only) to extract the encodings")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                tmp,
                LITELLM_REQUIREMENT,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("litellm-*.whl"))
        found: dict[str, bytes] = {}
        with zipfile.ZipFile(wheel) as archive:
            for encoding in missing:
                data = archive.read(LITELLM_TOKENIZER_DIR + encoding.cache_key)
                if not _valid(data, encoding):
                    raise SystemExit(f"{encoding.name}: the file in {wheel.name} fails its SHA-256 check")
                found[encoding.name] = data
        return found


def ensure_encodings(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    missing = []
    for encoding in ENCODINGS:
        target = dest / encoding.cache_key
        if target.exists() and _valid(target.read_bytes(), encoding):
            continue
        data = _from_source(encoding)
        if data is None:
            missing.append(encoding)
        else:
            _write_atomically(target, data)
    if missing:
        for name, data in _from_litellm_wheel(missing).items():
            encoding = next(e for e in ENCODINGS if e.name == name)
            _write_atomically(dest / encoding.cache_key, data)
    _check_with_tiktoken(dest)


def _check_with_tiktoken(dest: Path) -> None:
    """Load each encoding through tiktoken itself, with the network unused, as the runtime will."""
    os.environ["TIKTOKEN_CACHE_DIR"] = str(dest)
    try:
        import tiktoken
    except ImportError:  # the SAM layer build runs this before tiktoken is importable
        return
    for encoding in ENCODINGS:
        tiktoken.get_encoding(encoding.name).encode("ok")
    print(f"tiktoken encodings ready in {dest}: {', '.join(e.name for e in ENCODINGS)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    ensure_encodings(Path(sys.argv[1]).resolve())
