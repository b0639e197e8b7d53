"""Listing a tenant's jobs and contexts, newest first, a page at a time.

Each listed item carries a *position*: its creation time in milliseconds, zero-padded, then its id
(``0001795000000123#job_...``). Positions are unique and sort as creation does, so a page is "the
``limit`` items before this position" (one Query on the table's sparse list index, descending) and
the next page starts strictly after the last item returned: no item is skipped or repeated, whatever
is created or changes status meanwhile.

The cursor handed to clients is that position, bound to the tenant, the listing and its filter, and
signed (HMAC-SHA256) so a client can neither forge one nor reuse another tenant's: a cursor that does
not verify is a 400, never a silent restart. The queries are scoped to the caller's tenant by their
partition key anyway; the signature makes a bad cursor an error a client can act on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from spool_core.errors import ConfigurationError, InvalidRequest
from spool_core.settings import Settings
from spool_core.tenancy import Tenant

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_CURSOR_LENGTH = 1024
_KEY_PURPOSE = b"spool/list-cursor/v1"  # the cursor key is derived, never the events secret itself


def position(created_at: str, ident: str) -> str:
    """The sortable, unique list position of an item created at ``created_at`` (RFC 3339)."""
    moment = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return f"{round(moment.timestamp() * 1000):013d}#{ident}"


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(
            f"limit must be 1..{MAX_LIMIT}, not {limit}",
            details={"fields": [{"field": "limit", "value": limit, "min": 1, "max": MAX_LIMIT}]},
            suggestions=[f"Send limit between 1 and {MAX_LIMIT} (default {DEFAULT_LIMIT})"],
        )
    return limit


class Page(NamedTuple):
    """One page of a listing: ``next_cursor`` is None on the last page."""

    data: list[dict[str, Any]]
    next_cursor: str | None

    def body(self) -> dict[str, Any]:
        return {"data": self.data, "next_cursor": self.next_cursor}


class CursorCodec:
    """Encodes list positions as opaque cursors (base64url JSON and an HMAC) and checks them back."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _KEY_PURPOSE, hashlib.sha256).digest()

    def encode(self, tenant: Tenant, listing: str, where: str, at: str) -> str:
        payload = _b64(
            json.dumps({"t": tenant.id, "l": listing, "w": where, "p": at}, separators=(",", ":")).encode()
        )
        return f"{payload}.{_b64(self._mac(payload))}"

    def decode(self, cursor: str, tenant: Tenant, listing: str, where: str) -> str:
        """The position a cursor names, or ``invalid_request`` when it was not issued by this listing
        for this tenant and filter (malformed, altered, another tenant's, another filter's)."""
        payload, _, signature = cursor.partition(".")
        claims: Any = None
        if len(cursor) <= MAX_CURSOR_LENGTH and cursor.isascii():
            try:
                if hmac.compare_digest(_unb64(signature), self._mac(payload)):
                    claims = json.loads(_unb64(payload))
            except (ValueError, TypeError):
                claims = None
        if not isinstance(claims, dict) or not isinstance(claims.get("p"), str):
            raise _bad_cursor("The cursor is not one this API issued (malformed or altered)", cursor)
        if claims.get("t") != tenant.id or claims.get("l") != listing:
            raise _bad_cursor(f"The cursor was not issued for this tenant's {listing} listing", cursor)
        if claims.get("w") != where:
            issued = claims.get("w") or "no filter"
            raise _bad_cursor(
                f"The cursor was issued for {issued}, not {where or 'no filter'}",
                cursor,
                suggestions=[
                    "Send the cursor with the same filter as the page it came from",
                    "Omit cursor to start the new listing at its first page",
                ],
            )
        return str(claims["p"])

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()


def cursor_codec(config: Settings) -> CursorCodec:
    """The deployment's cursor codec: its key is derived from the secret that signs ``links.events``
    (Secrets Manager, read through Powertools Parameters and cached five minutes), so every function
    and every execution environment reads the cursors the others issued."""
    if not config.events_secret_arn:
        raise ConfigurationError(
            "SPOOL_EVENTS_SECRET_ARN is not set: list cursors cannot be signed",
            suggestions=["Set SPOOL_EVENTS_SECRET_ARN (template.yaml Globals) and redeploy"],
        )
    from spool_core import bootstrap

    return CursorCodec(bootstrap.secret_value(config.events_secret_arn, config).encode())


def _bad_cursor(message: str, cursor: str, suggestions: Sequence[str] | None = None) -> InvalidRequest:
    return InvalidRequest(
        message,
        details={"fields": [{"field": "cursor", "value": cursor[:64]}]},
        suggestions=list(
            suggestions
            or [
                "Pass back exactly the next_cursor of the previous page, with the same key and filter",
                "Omit cursor to start at the first (newest) page",
            ]
        ),
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "CursorCodec", "Page", "check_limit", "cursor_codec", "position"]
