"""Opaque, unguessable, prefixed identifiers (128 random bits)."""

from __future__ import annotations

import base64
import secrets


def new_id(prefix: str) -> str:
    """``ctx_`` + 26 lowercase base32 characters carrying 128 bits from the OS's CSPRNG."""
    raw = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    return f"{prefix}_{raw}"
