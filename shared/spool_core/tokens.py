"""Token counting with tiktoken, by model family.

OpenAI's GPT-4o-class models use ``o200k_base``; everything else is counted with ``cl100k_base``
and multiplied by a per-family calibration (see docs/decisions.md), because other vendors'
tokenizers are not public or not shipped. Counting uses ``encode_ordinary`` so text that looks
like a special token is counted as text, never rejected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import tiktoken

CL100K = "cl100k_base"
O200K = "o200k_base"
DEFAULT_ENCODING = CL100K

# Chat formatting overhead as OpenAI documents it for its chat models: per message, then per reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class FamilyTokenizer(NamedTuple):
    encoding: str
    calibration: float


FAMILIES: Mapping[str, FamilyTokenizer] = {
    "openai-o200k": FamilyTokenizer(O200K, 1.0),  # gpt-4o, gpt-4.1, o-series
    "openai": FamilyTokenizer(CL100K, 1.0),  # gpt-4, gpt-3.5
    "anthropic": FamilyTokenizer(CL100K, 1.2),
    "meta-llama": FamilyTokenizer(CL100K, 1.05),
    "mistral": FamilyTokenizer(CL100K, 1.15),
    "amazon": FamilyTokenizer(CL100K, 1.1),
    "simulated": FamilyTokenizer(CL100K, 1.0),
}
_FALLBACK = FamilyTokenizer(CL100K, 1.2)


def family_tokenizer(family: str) -> FamilyTokenizer:
    return FAMILIES.get(family, _FALLBACK)


@lru_cache(maxsize=4)
def encoding(name: str) -> tiktoken.Encoding:
    """Loaded on the first count (what costs is the encoding's file, ~0.1-0.3 s, not the module)."""
    import tiktoken

    return tiktoken.get_encoding(name)


def count(text: str, encoding_name: str = DEFAULT_ENCODING) -> int:
    return len(encoding(encoding_name).encode_ordinary(text)) if text else 0


def count_messages(messages: Iterable[Mapping[str, Any]], encoding_name: str = DEFAULT_ENCODING) -> int:
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE + count(str(message.get("role", "")), encoding_name)
        total += count(str(message.get("content", "")), encoding_name)
    return total + TOKENS_PER_REPLY if total else 0


def calibrate(tokens: int, factor: float) -> int:
    return tokens if factor == 1.0 else math.ceil(tokens * factor)
