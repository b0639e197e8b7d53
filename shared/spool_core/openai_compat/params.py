"""Which OpenAI request parameters Spool honours, which it accepts and ignores (harmless ones, each
with its reason), and which it refuses: a parameter that would change the answer and that Spool
cannot honour is a 400 naming it, never silently dropped."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from spool_core.errors import InvalidRequest


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


def _absent_or(*allowed: Any) -> Callable[[Any], bool]:
    """None, or one of ``allowed`` as JSON has it: ``false`` is not the number 0 (Python's ``==`` says
    it is)."""
    return lambda value: (
        value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)
    )


def _empty(value: Any) -> bool:
    return value in (None, [], {}, 0, False)


def _no_stop(value: Any) -> bool:
    """``stop`` left empty: ``null``, ``""`` or ``[]`` (a stop sequence would change the answer)."""
    return value in (None, "", [])


def _no_reasoning(value: Any) -> bool:
    """``reasoning`` that asks for nothing: ``null``, ``{}``, or options all ``null`` (as the SDKs send
    ``effort=None``); an effort or a summary would change what a reasoning model does."""
    return value is None or (isinstance(value, Mapping) and all(v is None for v in value.values()))


def _no_list(value: Any) -> bool:
    """A list parameter left empty: ``null`` or ``[]`` (``false`` is no list: OpenAI refuses it)."""
    return value is None or value == []


def _of(*types: type, low: float | None = None, high: float | None = None) -> Callable[[Any], bool]:
    """An ignored parameter's value as OpenAI checks it: one of ``types`` (a bool is no number), within
    ``low``-``high`` for a number; ``null`` always."""

    def check(value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            return False
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (low is None or value >= low) and (high is None or value <= high)
        return True

    return check


# What an ignored parameter may hold: it changes nothing, but a value OpenAI refuses is refused here
# too (``seed="x"`` or ``store="yes"`` was accepted, so a client's bug showed only against OpenAI).
_IGNORED_VALUES: dict[str, Callable[[Any], bool]] = {
    "user": _of(str),
    "safety_identifier": _of(str),
    "seed": _of(int),
    "top_p": _of(int, float, low=0, high=1),
    "store": _of(bool),
    "service_tier": lambda value: value in (None, "auto", "default", "flex", "scale", "priority"),
    "prompt_cache_key": _of(str),
    "prompt_cache_retention": _of(str),
    "prompt_cache_options": _of(dict),
}


def _text_format(value: Any) -> bool:
    """Chat's ``response_format``: plain text only (no JSON mode, no schema)."""
    return value is None or (isinstance(value, Mapping) and value.get("type") == "text")


def _text_options(value: Any) -> bool:
    """The Responses API's ``text``: its ``format`` plain text (or left out), and ``verbosity`` the
    default (``medium``) or left out: another verbosity would change the answer, and no provider
    here takes one."""
    if not isinstance(value, Mapping) or not set(value) <= {"format", "verbosity"}:
        return False
    return _text_format(value.get("format")) and value.get("verbosity") in (None, "medium")


class Policy:
    """Parameter names -> how Spool treats them, for one endpoint."""

    # Accepted and ignored, with why it is harmless (README's table lists them).
    IGNORED: ClassVar[dict[str, str]] = {}
    # Accepted only with values that change nothing; anything else is refused.
    NEUTRAL: ClassVar[dict[str, Callable[[Any], bool]]] = {}
    SUPPORTED: ClassVar[frozenset[str]] = frozenset()
    ENDPOINT: ClassVar[str] = ""

    @classmethod
    def check(cls, body: Mapping[str, Any]) -> None:
        for name, value in body.items():
            if name in cls.IGNORED and not _IGNORED_VALUES.get(name, lambda _: True)(value):
                raise InvalidRequest(
                    f"Parameter '{name}' has a value OpenAI refuses: {_short(value)}",
                    details={"param": name},
                    suggestions=[f"Send '{name}' as the OpenAI API reference types it, or leave it out"],
                )
            if name in cls.SUPPORTED or name in cls.IGNORED:
                continue
            if name in cls.NEUTRAL and cls.NEUTRAL[name](value):
                continue
            raise UnsupportedParameter(
                f"Parameter '{name}' is not supported by Spool's {cls.ENDPOINT}"
                + (f" with the value {_short(value)}" if name in cls.NEUTRAL else ""),
                details={"param": name},
                suggestions=[
                    f"Remove '{name}' from the request",
                    "See the README's table of supported OpenAI parameters",
                ],
            )


class ChatPolicy(Policy):
    ENDPOINT = "/v1/chat/completions"
    SUPPORTED = frozenset(
        {
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "stream",
            "stream_options",
            "metadata",
            "context_id",
            "fallback",
        }
    )
    IGNORED: ClassVar[dict[str, str]] = {
        "user": "an end-user id for abuse tracking; Spool keys tenants by API key",
        "safety_identifier": "as user",
        "seed": "accepted; the simulated models are deterministic anyway, real providers get no seed",
        "top_p": "accepted and not passed on: use temperature",
        "store": "every job is stored (GET /v1/jobs/{id}) for the life of its log",
        "service_tier": "Spool has one tier",
        "prompt_cache_key": "providers cache prompts by themselves",
        "prompt_cache_retention": "as prompt_cache_key",
        "prompt_cache_options": "as prompt_cache_key",
    }
    NEUTRAL: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "n": _absent_or(1),
        "logprobs": _absent_or(False),
        "top_logprobs": _absent_or(0),
        "frequency_penalty": _absent_or(0, 0.0),
        "presence_penalty": _absent_or(0, 0.0),
        "logit_bias": _empty,
        "tools": _no_list,
        "tool_choice": _absent_or("none", "auto"),
        "parallel_tool_calls": lambda value: True if value is None else isinstance(value, bool),
        "functions": _no_list,
        "function_call": _absent_or("none", "auto"),
        "response_format": _text_format,
        "modalities": _absent_or(["text"]),
        "stop": _no_stop,
    }


class ResponsesPolicy(Policy):
    ENDPOINT = "Responses API"
    SUPPORTED = frozenset(
        {
            "model",
            "input",
            "instructions",
            "max_output_tokens",
            "temperature",
            "background",
            "stream",
            "stream_options",
            "metadata",
            "context_id",
            "fallback",
        }
    )
    IGNORED: ClassVar[dict[str, str]] = {
        "user": ChatPolicy.IGNORED["user"],
        "safety_identifier": ChatPolicy.IGNORED["safety_identifier"],
        "top_p": ChatPolicy.IGNORED["top_p"],
        "store": "every response is stored for the life of its log",
        "service_tier": ChatPolicy.IGNORED["service_tier"],
        "prompt_cache_key": ChatPolicy.IGNORED["prompt_cache_key"],
        "prompt_cache_retention": ChatPolicy.IGNORED["prompt_cache_key"],
        "prompt_cache_options": ChatPolicy.IGNORED["prompt_cache_key"],
    }
    NEUTRAL: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "tools": _no_list,
        "tool_choice": _absent_or("none", "auto"),
        "parallel_tool_calls": lambda value: True if value is None else isinstance(value, bool),
        "text": _text_options,
        "truncation": _absent_or("disabled"),
        "include": _empty,
        "top_logprobs": _absent_or(0),
        "max_tool_calls": _absent_or(None),
        "previous_response_id": _absent_or(None),
        "conversation": _absent_or(None),
        "prompt": _absent_or(None),
        "reasoning": _no_reasoning,
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse[M: BaseModel](model: type[M], body: Any, policy: type[Policy]) -> M:
    """The request as ``model``, after the parameter policy: a 400 names the first offending
    parameter (``details.param``, which OpenAI SDKs expose as ``error.param``). A parameter sent as
    ``null`` is read as left out, as OpenAI reads it (the SDKs send ``null`` for ``param=None``)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest(
            "The request body must be a JSON object",
            details={"param": None},
            suggestions=["Send a JSON object with 'Content-Type: application/json'"],
        )
    given = {name: value for name, value in body.items() if value is not None}
    policy.check(given)
    return validated(model, given)


def validated[M: BaseModel](model: type[M], values: Mapping[str, Any]) -> M:
    """``model`` from ``values``, or a 400 naming the first offending field as ``details.param``."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        fields = [
            {
                "field": ".".join(str(p) for p in err["loc"] if not _union_member(p)),
                "message": err["msg"],
                "type": err["type"],
            }
            for err in _in_the_sent_form(exc.errors(include_input=False), values)
        ]
        raise schema_error(fields) from None


def schema_error(
    fields: list[dict[str, Any]],
    details: Mapping[str, Any] | None = None,
    suggestions: list[str] | None = None,
) -> InvalidRequest:
    """The 400 of fields that do not match the schema, naming the first as ``details.param``."""
    names = ", ".join(dict.fromkeys(f["field"] for f in fields))
    return InvalidRequest(
        f"The request does not match the schema: {names} ({fields[0]['message']})",
        details={**(details or {}), "param": fields[0]["field"], "fields": fields},
        suggestions=suggestions,
    )


def _union_member(segment: Any) -> bool:
    """A ``loc`` segment pydantic adds for a union's member (``str``, ``list[InputMessage]``), which
    names no field of the request."""
    return isinstance(segment, str) and (segment in {"str", "int", "float", "bool"} or "[" in segment)


def _in_the_sent_form(errors: list[Any], values: Mapping[str, Any]) -> list[Any]:
    """A value that fits no member of a union fails once per member: for a list of 1,001 items, "Input
    should be a valid string" beside "at most 1000 items". At each union on an error's path, an error
    under a member whose form the sent value does not have is dropped when another member's form is
    the value's (a list's errors, for a list); when no member's form is the value's, all are kept."""

    def decisions(err: Any) -> list[tuple[tuple[Any, ...], str, Any]]:
        made, node, loc = [], values, err["loc"]
        for at, segment in enumerate(loc):
            if _union_member(segment):
                made.append((tuple(loc[:at]), segment, node))
            elif (isinstance(node, Mapping) and segment in node) or (
                isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node)
            ):
                node = node[segment]
            else:
                break  # past what was sent (a missing field): nothing left to tell apart
        return made

    made = [decisions(err) for err in errors]
    members: dict[tuple[Any, ...], set[str]] = {}
    for prefix, member, _ in (d for err in made for d in err):
        members.setdefault(prefix, set()).add(member)

    def wrong(prefix: tuple[Any, ...], member: str, value: Any) -> bool:
        return not _of_form(member, value) and any(_of_form(m, value) for m in members[prefix])

    return [err for err, chosen in zip(errors, made, strict=True) if not any(wrong(*d) for d in chosen)]


def _of_form(member: str, value: Any) -> bool:
    if member == "str":
        return isinstance(value, str)
    if member == "bool":
        return isinstance(value, bool)
    if member in {"int", "float"}:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if member.startswith("list["):
        return isinstance(value, list)
    return isinstance(value, Mapping) if member.startswith("dict[") else True


__all__ = [
    "ChatPolicy",
    "Policy",
    "ResponsesPolicy",
    "UnsupportedParameter",
    "parse",
    "schema_error",
    "validated",
]
