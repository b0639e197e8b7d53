"""Request fields as JSON has them: a number is a JSON number and a boolean a JSON boolean.

pydantic's lax mode reads ``true`` as the integer 1, ``"200"`` as 200 and ``"no"`` as false, so a
job asked for ``max_tokens: true`` was a job of one token. Its strict mode goes too far the other way
for JSON, whose numbers have one type: it refuses ``200.0`` for an integer, which Python's
``json.dumps`` writes for a float that holds a whole number (``timedelta.total_seconds()``). These
types keep what JSON means: a whole number however it is written, and never a string or a boolean.
The same types read the items stored in DynamoDB back (``Decimal`` numbers pass)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Strict


def _not_a_string_or_boolean(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError(
            f"must be a JSON number, not {'a boolean' if isinstance(value, bool) else 'a string'}"
        )
    return value


JsonInt = Annotated[int, BeforeValidator(_not_a_string_or_boolean)]  # 200 or 200.0; not 200.5, true, "200"
JsonFloat = Annotated[float, BeforeValidator(_not_a_string_or_boolean)]  # 0.5 or 1; not "0.5"
JsonBool = Annotated[bool, Strict()]  # true or false; not "no", 0 or "false"

__all__ = ["JsonBool", "JsonFloat", "JsonInt"]
