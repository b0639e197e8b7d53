"""Spool's dev-side package: the embedded stack, the CLI, the client. Never shipped to Lambda."""
