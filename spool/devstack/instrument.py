"""Benchmark instrumentation: count the AWS API calls a process makes, by service and operation."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import botocore.client


class AwsCallCounter:
    """Wraps botocore's one call path, so every client in the process is counted. Off unless installed."""

    def __init__(self, dump_to: Path | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._by_thread: Counter[tuple[str, str]] = Counter()
        self._dump_to = dump_to
        self._lock = threading.Lock()

    def install(self) -> AwsCallCounter:
        client_class: Any = botocore.client.BaseClient
        original = client_class._make_api_call
        counter = self

        def counting(client: Any, operation_name: str, api_params: dict[str, object]) -> object:
            counter._record(f"{client.meta.service_model.service_name}.{operation_name}")
            counter._by_thread[(threading.current_thread().name, client.meta.service_model.service_name)] += 1
            return original(client, operation_name, api_params)

        client_class._make_api_call = counting
        return self

    def _record(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
            if self._dump_to is not None:
                self._dump_to.write_text(json.dumps(self.counts))

    def by_threads(self, service: str, prefix: str) -> int:
        """Calls to ``service`` made from threads whose name starts with ``prefix`` (one function's
        invocations: the local runtime names its threads after the function)."""
        with self._lock:
            return sum(
                n
                for (thread, svc), n in self._by_thread.items()
                if svc == service and thread.startswith(prefix)
            )

    def total(self, service: str, operations: tuple[str, ...] | None = None) -> int:
        with self._lock:
            return sum(
                n
                for name, n in self.counts.items()
                if name.startswith(f"{service}.")
                and (operations is None or name.split(".", 1)[1] in operations)
            )
