"""Request fields as JSON has them: a number is a JSON number and a boolean a JSON boolean.

pydantic's lax mode reads ``true`` as the integer 1, ``"200"`` as 200 and ``"no"`` as false, so a
job asked for ``max_tokens: true`` was a job of one token. Its strict mode goes too far the other way
for JSON, whose numbers have one type: it refuses ``200.0`` for an integer, which Python's
``json.dumps`` writes for a float that holds a whole number (``timedelta.total_seconds()``). A model
keeps what JSON means with ``JsonBool`` for its booleans and ``json_numbers(...)`` for its numbers: a
whole number however it is written, never a string or a boolean. (A field validator, not an annotated
type: pydantic then keeps the fields' bounds in the JSON schema.) Stored items read back unchanged:
``Decimal`` numbers pass."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Strict, field_validator

JsonBool = Annotated[bool, Strict()]  # true or false; not "no", 0 or "false"


def _not_a_string_or_boolean(cls: type, value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError(
            f"must be a JSON number, not {'a boolean' if isinstance(value, bool) else 'a string'}"
        )
    return value


def json_numbers(*fields: str) -> Any:
    """A model's validator refusing a string or a boolean for any of ``fields`` (numbers)."""
    return field_validator(*fields, mode="before")(_not_a_string_or_boolean)


__all__ = ["JsonBool", "json_numbers"]
