"""Quantities as Spool stores them: integers in small units, never floats.

A float written to DynamoDB becomes a decimal string, and small ones take exponent forms (a 1-token
settlement at a high limit was ``6E-7`` seconds); sums of floats drift. So money is kept in
nano-dollars (a price of $0.15 per million tokens is exactly 150 nano-dollars a token), instants and
durations in milliseconds, and token-bucket times in microseconds. Floats appear only at the edge,
where the API shows dollars.
"""

from __future__ import annotations

import time
from decimal import ROUND_HALF_UP, Decimal

NANOS_PER_USD = 1_000_000_000


def usd(nanos: int) -> float:
    """Nano-dollars as the API shows them (dollars, to the nano-dollar)."""
    return round(nanos / NANOS_PER_USD, 9)


def usd_text(nanos: int) -> str:
    """Nano-dollars for a message: cents when they say it all ("5.00"), else the significant
    digits (a budget of $0.0004 is not "0.00")."""
    dollars, rest = divmod(abs(nanos), NANOS_PER_USD)  # in integers: exact at any size
    sign = "-" if nanos < 0 else ""
    if rest % (NANOS_PER_USD // 100) == 0:
        return f"{sign}{dollars:,}.{rest // (NANOS_PER_USD // 100):02d}"
    return f"{sign}{dollars:,}.{rest:09d}".rstrip("0")


def nanos(dollars: float | str | Decimal) -> int:
    """Dollars (as configured or sent) to nano-dollars, rounded half up."""
    return int((Decimal(str(dollars)) * NANOS_PER_USD).to_integral_value(ROUND_HALF_UP))


def price_nanos(tokens: int, usd_per_million_tokens: float) -> int:
    """The price of ``tokens`` at a per-million-token price: $p/Mtok is p x 1,000 nano-dollars a token."""
    return int(
        (Decimal(tokens) * Decimal(str(usd_per_million_tokens)) * 1000).to_integral_value(ROUND_HALF_UP)
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ms(seconds: float) -> int:
    return round(seconds * 1000)
