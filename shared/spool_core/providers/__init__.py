"""Model providers behind one port: stream text, report usage, classify errors, say whether they
can continue from a prefix."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from spool_core.chat import Message


@dataclass(frozen=True)
class GenerationRequest:
    provider_model_id: str
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed generation continues: the token count and text already persisted.

    ``text`` is loaded only for providers that continue from a text prefix; providers that
    continue from a token index (``resumes_by_index``) get an empty string.
    """

    tokens: int = 0
    text: str = ""
    attempt: int = 1  # delivery attempt of the job (1 = first)


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    input_tokens: int
    output_tokens: int | None  # None: the provider did not say (the worker's own count stands)
    stop_reason: str = "end_turn"  # the provider's own word (end_turn, stop, max_tokens, length, ...)

    @property
    def finish_reason(self) -> str:
        """Why the answer ended, in one vocabulary: ``stop`` (the model finished), ``length`` (it
        reached max_tokens) or ``content_filter`` (the provider withheld the rest)."""
        reason = self.stop_reason.lower()
        if reason in {"max_tokens", "length", "max_output_tokens", "model_context_window_exceeded"}:
            return "length"
        if reason in {"content_filter", "content_filtered", "guardrail_intervened"}:
            return "content_filter"
        return "stop"


StreamEvent = TextDelta | Finished


class ProviderError(Exception):
    """A provider failure, classified: retryable ones are retried with backoff, then fall back."""

    def __init__(self, message: str, *, retryable: bool, code: str = "provider_error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class ProviderMisconfigured(ProviderError):
    """The deployment cannot call this model at all (its API key's reference names a variable, an SSM
    parameter or a secret the function cannot read, or is of no known kind): no retry or later
    attempt can succeed, the operator must fix it. The job goes on with the model's fallbacks, or
    fails saying what to fix."""

    CODE = "provider_misconfigured"

    def __init__(self, message: str, suggestions: list[str]) -> None:
        super().__init__(message, retryable=False, code=self.CODE)
        self.suggestions = suggestions


class Provider(Protocol):
    name: str
    supports_prefill: bool
    resumes_by_index: bool

    def stream(self, request: GenerationRequest, resume: ResumePoint) -> Iterator[StreamEvent]: ...
