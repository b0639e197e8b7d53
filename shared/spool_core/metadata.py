"""Caller metadata on jobs and contexts: free-form JSON that Spool stores as a DynamoDB map.

DynamoDB refuses what JSON allows: NaN and infinities, numbers beyond 38 significant digits or
outside 1E-130..9.99E+125, documents nested more than 32 levels, items over 400 KB. A value it
refuses must be a 400 naming the field before anything is written, never a write that fails
(and a 503 "retry" that can never succeed). The bounds here are tighter than DynamoDB's so the
metadata always fits beside the rest of the item.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import AfterValidator

from spool_core.errors import InvalidRequest, PayloadTooLarge

MAX_BYTES = 16 * 1024  # as compact JSON; a job's item also carries its messages' summary and output
MAX_DEPTH = 16  # DynamoDB nests 32 levels; the item itself and the envelope take some
_MAX_DIGITS = 38  # significant digits
_LARGEST = 9.99e125
_SMALLEST = 1e-130


def _invalid(path: str, problem: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{path}' cannot be stored: {problem}",
        details={"fields": [{"field": path, "message": problem}]},
        suggestions=[
            "Metadata is JSON stored as-is: finite numbers of at most 38 digits, strings, "
            f"lists and objects nested at most {MAX_DEPTH} levels, {MAX_BYTES} bytes in all"
        ],
    )


def _check_number(path: str, value: int | float) -> None:
    if isinstance(value, int):
        # DynamoDB keeps 38 significant digits up to 9.99E+125: 10**40 is fine, 10**38 + 1 is not
        if abs(value) > _LARGEST or len(str(abs(value)).rstrip("0")) > _MAX_DIGITS:
            raise _invalid(path, "integers have at most 38 significant digits")
        return
    if not math.isfinite(value):
        raise _invalid(path, "NaN and Infinity are not numbers JSON or DynamoDB can store")
    if value and not _SMALLEST <= abs(value) <= _LARGEST:
        raise _invalid(path, "numbers must lie between 1e-130 and 9.99e125 in magnitude")


def size(value: dict[str, Any]) -> int:
    """Bytes of ``value`` as compact JSON (what it adds to a context's size; none when empty)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) if value else 0


def check(value: dict[str, Any], field: str = "metadata") -> dict[str, Any]:
    """Raise ``InvalidRequest`` (which value, why) or ``PayloadTooLarge``; return ``value`` unchanged.

    Iterative, so a deep document costs a bounded stack; the depth limit stops it early."""
    pending: list[tuple[str, Any, int]] = [(field, value, 1)]
    while pending:
        path, item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise _invalid(path, f"nested deeper than {MAX_DEPTH} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            pending.extend((f"{path}.{key}", child, depth + 1) for key, child in pairs)
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        elif isinstance(item, int | float):
            _check_number(path, item)
    size_bytes = size(value)
    if size_bytes > MAX_BYTES:
        raise PayloadTooLarge(
            f"'{field}' is {size_bytes:,} bytes; at most {MAX_BYTES:,} are stored",
            details={"field": field, "size_bytes": size_bytes, "limit_bytes": MAX_BYTES},
            suggestions=["Keep large data in the context (POST /v1/contexts) and reference it by id"],
        )
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(check)]
