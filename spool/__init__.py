"""Spool's dev-side package: the client, the CLI, the embedded stack. Never shipped to Lambda."""

from spool.client import Client, SpoolError

__all__ = ["Client", "SpoolError"]
