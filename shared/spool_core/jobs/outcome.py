"""What a queue consumer does with a job's message once its handler returns. Its own module so the
dead-letter consumer, which never runs a job, does not load the runner (and the context service,
circuits and providers with it)."""

from __future__ import annotations

from enum import Enum


class Outcome(Enum):
    DONE = "done"  # the message can be deleted
    RETRY = "retry"  # leave the message: it returns after its visibility timeout
    YIELD = "yield"  # out of time: a continuation message was queued; this one can be deleted
