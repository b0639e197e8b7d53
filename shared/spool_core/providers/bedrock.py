"""Amazon Bedrock through the Converse streaming API (boto3 ``converse_stream``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import TYPE_CHECKING, Any

import urllib3
from botocore.exceptions import BotoCoreError, ClientError

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
    from mypy_boto3_bedrock_runtime import BedrockRuntimeClient

THROTTLED = {"ThrottlingException", "TooManyRequestsException", "throttlingException"}
UNAVAILABLE = {
    "ServiceUnavailableException",
    "serviceUnavailableException",
    "InternalServerException",
    "internalServerException",
    "ModelTimeoutException",
    "modelTimeoutException",
    "ModelStreamErrorException",
    "modelStreamErrorException",
    "ModelNotReadyException",
    "RequestTimeout",
}
MODEL_UNAVAILABLE = {"AccessDeniedException", "ResourceNotFoundException"}
# A model Bedrock serves only through an inference profile, called by its model id: a refusal of the
# registry's id, not of the request, so the job moves on to its fallbacks.
NEEDS_PROFILE = ("on-demand throughput", "inference profile")


def classify(code: str, message: str) -> ProviderError:
    if code in THROTTLED:
        return ProviderError(f"Bedrock throttled: {message}", retryable=True, code="provider_throttled")
    if code in UNAVAILABLE:
        return ProviderError(
            f"Bedrock unavailable ({code}): {message}", retryable=True, code="provider_unavailable"
        )
    if code in MODEL_UNAVAILABLE or (
        code == "ValidationException" and any(words in message for words in NEEDS_PROFILE)
    ):
        return ProviderError(
            f"The model is not available here ({code}): {message}",
            retryable=False,
            code="provider_model_unavailable",
        )
    return ProviderError(f"Bedrock refused ({code}): {message}", retryable=False, code="provider_error")


class BedrockProvider:
    name = "bedrock"
    resumes_by_index = False

    def __init__(self, client: BedrockRuntimeClient, *, supports_prefill: bool) -> None:
        self._client = client
        # Claude on Bedrock continues a trailing assistant turn (prefill); other models get an instruction.
        self.supports_prefill = supports_prefill

    def stream(self, request: GenerationRequest, resume: ResumePoint) -> Iterator[StreamEvent]:
        # Claude refuses a prefill that ends in whitespace ("final assistant content cannot end with
        # trailing whitespace"), and a chunk often does (a line's end, a space): the prefill goes
        # without it, and the continuation's text that repeats it is not written again.
        held = ""
        if self.supports_prefill and resume.text:
            kept = resume.text.rstrip()  # all of it, when nothing but whitespace was written: no prefill
            held = resume.text[len(kept) :]
            resume = ResumePoint(tokens=resume.tokens, text=kept, attempt=resume.attempt)
        conversation = resumed_messages(request.messages, resume, prefill=self.supports_prefill)
        system = [{"text": m.content} for m in conversation if m.role == "system"]
        messages = [
            {"role": m.role, "content": [{"text": m.content}]} for m in conversation if m.role != "system"
        ]
        kwargs: dict[str, Any] = {
            "modelId": request.provider_model_id,
            "messages": messages,
            "inferenceConfig": {
                "maxTokens": max(1, request.max_tokens - resume.tokens),
                "temperature": min(1.0, request.temperature),
            },
        }
        if system:
            kwargs["system"] = system
        try:
            response = self._client.converse_stream(**kwargs)
            stop_reason, usage = "end_turn", None
            with closing(response["stream"]) as stream:  # however the reading ends (spool_core.jobs.watch)
                for event in stream:
                    if "contentBlockDelta" in event:
                        text = event["contentBlockDelta"]["delta"].get("text", "")
                        if held and text:
                            text, held = _without_repeat(text, held)
                        if text:
                            yield TextDelta(text, max(1, tokens.count(text)))
                    elif "messageStop" in event:
                        stop_reason = event["messageStop"].get("stopReason", stop_reason)
                    elif "metadata" in event:
                        usage = event["metadata"].get("usage")
        except ClientError as exc:  # EventStreamError (an exception event mid-stream) is a ClientError too
            error = exc.response.get("Error", {})
            raise classify(str(error.get("Code", "")), str(error.get("Message", exc))) from exc
        except (
            BotoCoreError,
            urllib3.exceptions.HTTPError,
            OSError,
        ) as exc:  # the connection broke mid-answer
            raise ProviderError(
                f"The Bedrock stream broke: {exc}", retryable=True, code="provider_unavailable"
            ) from exc
        if usage is None:
            raise ProviderError(
                "The Bedrock stream ended without its metadata", retryable=True, code="provider_unavailable"
            )
        yield Finished(int(usage["inputTokens"]), int(usage["outputTokens"]), stop_reason)


def _without_repeat(text: str, held: str) -> tuple[str, str]:
    """``text`` less what it repeats of ``held`` (the whitespace already written that the prefill left
    out) from its start, and what of ``held`` a next delta may still repeat ("" once it differs)."""
    same = 0
    while same < min(len(text), len(held)) and text[same] == held[same]:
        same += 1
    return text[same:], (held[same:] if same == len(text) else "")
