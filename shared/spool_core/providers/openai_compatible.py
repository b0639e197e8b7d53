"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp) through the
official ``openai`` package, streaming with usage included.

``openai`` is imported where it is used (the client is made by ``bootstrap``, the errors classified
here), never with this module: it costs ~0.6 s, which only the functions that call a model pay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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


class OpenAICompatibleProvider:
    name = "openai"
    supports_prefill = False  # chat completions do not continue a trailing assistant turn
    resumes_by_index = False

    def __init__(self, client: openai.OpenAI) -> None:
        self._client = client

    def stream(self, request: GenerationRequest, resume: ResumePoint) -> Iterator[StreamEvent]:
        conversation = resumed_messages(request.messages, resume, prefill=False)
        try:
            messages: Any = [{"role": m.role, "content": m.content} for m in conversation]
            create: Any = self._client.chat.completions.create
            response: Any = create(
                model=request.provider_model_id,
                messages=messages,
                max_tokens=max(1, request.max_tokens - resume.tokens),
                temperature=request.temperature,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage, stop_reason = None, "stop"
            for chunk in response:
                for choice in chunk.choices:
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
        yield Finished(int(usage.prompt_tokens), int(usage.completion_tokens), stop_reason)
