"""Opaque, unguessable, prefixed identifiers (128 random bits)."""

from __future__ import annotations

import base64
import secrets


def new_id(prefix: str) -> str:
    """``ctx_`` + 26 lowercase base32 characters carrying 128 bits from the OS's CSPRNG."""
    raw = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    return f"{prefix}_{raw}"


MAX_ID_LENGTH = 64  # Spool's ids are 30 characters; DynamoDB refuses keys over 2,048 bytes


def plausible(value: str) -> bool:
    """Whether ``value`` could be an id at all: a longer or unprintable one is answered "not found"
    without a read (DynamoDB would refuse an oversized key with an error, not an empty answer)."""
    return 0 < len(value) <= MAX_ID_LENGTH and value.isprintable()
