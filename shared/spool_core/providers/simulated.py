"""The simulated provider: deterministic text, configurable speed, injectable faults.

The text is a pure function of the request (model, messages with the context, ``max_tokens``,
``temperature``) and the token index, so a resumed generation continues exactly where it stopped
and two jobs with the same request produce the same text. Faults (``metadata.simulate``) are honoured
only when ``SPOOL_SIMULATOR_FAULTS=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from spool_core import tokens
from spool_core.providers import (
    Finished,
    GenerationRequest,
    ProviderError,
    ResumePoint,
    StreamEvent,
    TextDelta,
)

_WORDS = [
    *("the", "context", "shows", "that", "this", "function", "reads", "the", "request", "validates", "each"),
    *("field", "and", "returns", "a", "typed", "result", "while", "errors", "are", "mapped", "once", "at"),
    *("the", "edge", "so", "every", "caller", "sees", "the", "same", "envelope", "the", "worker", "streams"),
    *("tokens", "into", "a", "durable", "log", "keyed", "by", "sequence", "id", "clients", "resume", "from"),
    *("the", "last", "chunk", "they", "saw", "nothing", "is", "lost", "and", "nothing", "repeats", "tenants"),
    *("are", "isolated", "by", "construction", "costs", "follow", "tokens"),
]
FAULTS = ("crash", "throttle", "server_error", "fatal")


def _seed(request: GenerationRequest) -> bytes:
    canonical = json.dumps(
        {
            "model": request.provider_model_id,
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).digest()


def token_text(seed: bytes, index: int) -> str:
    """The text of token ``index`` (0-based): words with sentence breaks, the same for the same seed."""
    digest = hashlib.blake2b(seed + index.to_bytes(8, "big"), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    word = _WORDS[value % len(_WORDS)]
    if index == 0:
        return word.capitalize()
    if value % 13 == 0:
        return ". " + word.capitalize()
    if value % 41 == 0:
        return ".\n\n" + word.capitalize()
    return " " + word


def _fault_problem(spec: Any) -> str | None:
    """What makes ``spec`` no fault (DESIGN, Models), or None when it is one."""
    example = '{"fault": "crash", "at_token": 10, "times": 1}'
    if not isinstance(spec, dict):
        return f"must be an object such as {example}"
    if spec.get("fault") not in FAULTS:
        return f"fault {str(spec.get('fault'))[:40]!r} is not one of {', '.join(FAULTS)}"
    for name, least in (("at_token", 0), ("times", 0)):
        value = spec.get(name, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"{name} must be a whole number >= {least}, not {str(value)[:40]!r}"
    if spec.get("model") is not None and not isinstance(spec["model"], str):
        return "model must be a model's id (a string), or null for any model"
    return None


def simulated_text(request: GenerationRequest, start: int = 0, stop: int | None = None) -> str:
    seed = _seed(request)
    return "".join(token_text(seed, i) for i in range(start, request.max_tokens if stop is None else stop))


def _crash() -> None:
    # What a Lambda timeout or an out-of-memory kill does: the process ends, no cleanup, no flush.
    os._exit(137)


class SimulatedProvider:
    name = "simulated"
    supports_prefill = True
    resumes_by_index = True  # the text of token i depends only on the request and i

    def __init__(
        self,
        *,
        faults_enabled: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        crash: Callable[[], None] = _crash,
    ) -> None:
        self._faults_enabled = faults_enabled
        self._sleep = sleep
        self._crash = crash
        self._calls = 0  # stream calls made by this provider instance (the in-invocation retry count)

    def stream(self, request: GenerationRequest, resume: ResumePoint) -> Iterator[StreamEvent]:
        self._calls += 1
        fault = self._fault(request.metadata, request.provider_model_id)
        rate = float(request.options.get("tokens_per_second") or 0)
        first_token_ms = float(request.options.get("first_token_ms") or 0)
        seed = _seed(request)
        if first_token_ms:
            self._sleep(first_token_ms / 1000)
        started = time.monotonic()
        for index in range(resume.tokens, request.max_tokens):
            if fault and index >= fault["at_token"] and self._fault_applies(fault, resume):
                self._raise(fault["fault"], index)
            if rate:
                due = started + (index - resume.tokens) / rate
                delay = due - time.monotonic()
                if delay > 0:
                    self._sleep(delay)
            yield TextDelta(token_text(seed, index))
        input_tokens = tokens.count_messages(m.model_dump() for m in request.messages)
        # Usage of this call, as a provider bills it: the prompt, and the tokens this call produced.
        # The simulated answer is, by design, exactly max_tokens long: there it ends, as a model's
        # answer ends at its last word (finish_reason "stop").
        yield Finished(input_tokens, request.max_tokens - resume.tokens, stop_reason="end_turn")

    def _fault(self, metadata: dict[str, Any], model: str) -> dict[str, Any] | None:
        """The fault ``metadata.simulate`` asks for (faults on), None for none. One it cannot read
        fails the job naming what is wrong: ignored, it would pass a test that meant to see a fault."""
        if not self._faults_enabled or "simulate" not in metadata:
            return None
        spec = metadata["simulate"]
        problem = _fault_problem(spec)
        if problem is not None:
            raise ProviderError(f"metadata.simulate: {problem}", retryable=False, code="provider_error")
        if spec.get("model") not in (None, model):  # a fault may target one model of a fallback chain
            return None
        return {
            "fault": spec["fault"],
            "at_token": int(spec.get("at_token", 0)),
            "times": int(spec.get("times", 1)),
        }

    def _fault_applies(self, fault: dict[str, Any], resume: ResumePoint) -> bool:
        # A crash ends the invocation, so its attempts are the job's deliveries; the others are
        # retried inside one invocation, so their attempts are this provider's calls.
        attempt = resume.attempt if fault["fault"] == "crash" else self._calls
        return bool(attempt <= fault["times"])

    def _raise(self, fault: str, index: int) -> None:
        if fault == "crash":
            self._crash()
        if fault == "throttle":
            raise ProviderError(
                f"simulated throttling at token {index}", retryable=True, code="provider_throttled"
            )
        if fault == "server_error":
            raise ProviderError(
                f"simulated server error at token {index}", retryable=True, code="provider_unavailable"
            )
        raise ProviderError(
            f"simulated permanent failure at token {index}", retryable=False, code="provider_error"
        )
