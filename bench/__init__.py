"""Benchmarks (`make bench`): printed figures measured on the embedded stack, never timed tests."""
