"""Continuing a generation that was cut off, on providers that take a text prefix or not."""

from __future__ import annotations

from collections.abc import Sequence

from spool_core.chat import Message
from spool_core.providers import ResumePoint

CONTINUE_INSTRUCTION = (
    "Your previous message was cut off. Continue it exactly where it stopped: do not repeat any of it, "
    "do not comment, just write the rest."
)


def resumed_messages(messages: Sequence[Message], resume: ResumePoint, *, prefill: bool) -> list[Message]:
    """The conversation to send when ``resume.text`` is already delivered: as an assistant prefill
    where the provider continues a trailing assistant turn, otherwise that turn plus an instruction."""
    conversation = list(messages)
    if not resume.text:
        return conversation
    conversation.append(Message(role="assistant", content=resume.text))
    if not prefill:
        conversation.append(Message(role="user", content=CONTINUE_INSTRUCTION))
    return conversation
