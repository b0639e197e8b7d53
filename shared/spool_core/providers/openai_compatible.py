"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp) through the
official ``openai`` package, streaming with usage included.

``openai`` is imported where it is used (the client is made by ``bootstrap``, the errors classified
here), never with this module: it costs ~0.6 s, which only the functions that call a model pay.

The stream is the SDK's own (its request, retries, status errors, SSE decoding and mid-stream
``error`` events), read as plain JSON (``Stream[object]``) and validated into the few fields the
worker uses, instead of into the SDK's ``ChatCompletionChunk``: the SDK builds each event's typed
object in Python, ~300 us of CPU per token event at 50 tok/s against ~140 us for this, and 20
concurrent streams spent about 0.2 cores on it (docs/decisions.md, "The provider's stream").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from spool_core import tokens
from spool_core.providers import (
    Finished,
    GenerationRequest,
    ProviderError,
    ResumePoint,
    StreamEvent,
    TextDelta,
)
from spool_core.providers.continuation import resumed_messages

if TYPE_CHECKING:
    import openai


def classify(exc: Exception) -> ProviderError:
    import openai  # loaded already: the exception came from its client

    if isinstance(exc, openai.RateLimitError):
        return ProviderError(f"The endpoint throttled: {exc}", retryable=True, code="provider_throttled")
    if isinstance(exc, openai.NotFoundError):
        return ProviderError(
            f"The model is not served: {exc}", retryable=False, code="provider_model_unavailable"
        )
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return ProviderError(f"The endpoint failed: {exc}", retryable=True, code="provider_unavailable")
    if isinstance(exc, openai.APIStatusError):
        return ProviderError(
            f"The endpoint refused the request: {exc}", retryable=False, code="provider_error"
        )
    # APIConnectionError, APITimeoutError, a stream cut mid-answer (httpx errors surface here too)
    return ProviderError(f"The endpoint's stream broke: {exc}", retryable=True, code="provider_unavailable")


class _Delta(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: int = 0
    completion_tokens: int | None = None  # a server that leaves it out: the worker's count is billed


class StreamedChunk(BaseModel):
    """What the worker reads of a ``chat.completion.chunk`` event (the rest is ignored)."""

    model_config = ConfigDict(extra="ignore")

    choices: list[_Choice] | None = None
    usage: _Usage | None = None


class OpenAICompatibleProvider:
    name = "openai"
    supports_prefill = False  # chat completions do not continue a trailing assistant turn
    resumes_by_index = False

    def __init__(self, client: openai.OpenAI) -> None:
        self._client = client

    def stream(self, request: GenerationRequest, resume: ResumePoint) -> Iterator[StreamEvent]:
        conversation = resumed_messages(request.messages, resume, prefill=False)
        try:
            from openai import Stream  # loaded already: the client is the SDK's

            body = {
                "model": request.provider_model_id,
                "messages": [{"role": m.role, "content": m.content} for m in conversation],
                "max_tokens": max(1, request.max_tokens - resume.tokens),
                "temperature": request.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            events: Any = self._client.post(
                "/chat/completions",
                body=body,
                # The provider's key only, as chat.completions.create sends it: a bare post would also
                # offer OPENAI_ADMIN_KEY from the environment, to whatever endpoint the model names.
                options={"security": {"bearer_auth": True}},
                cast_to=object,
                stream=True,
                stream_cls=Stream[object],
            )
            usage, stop_reason = None, "stop"
            with events:  # its response closed however the reading ends (spool_core.jobs.watch)
                for event in events:
                    chunk = StreamedChunk.model_validate(event)
                    for choice in chunk.choices or ():
                        if choice.delta and choice.delta.content:
                            yield TextDelta(choice.delta.content, max(1, tokens.count(choice.delta.content)))
                        if choice.finish_reason:
                            stop_reason = choice.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
        except Exception as exc:
            raise classify(exc) from exc
        if usage is None:
            raise ProviderError(
                "The stream ended without its usage (was it cut?)",
                retryable=True,
                code="provider_unavailable",
            )
        output = None if usage.completion_tokens is None else int(usage.completion_tokens)
        yield Finished(int(usage.prompt_tokens), output, stop_reason)
