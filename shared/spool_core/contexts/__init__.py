"""Contexts: upload once, reference by id, update by sending only what changed."""
