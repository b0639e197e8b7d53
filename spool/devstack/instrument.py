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
        self._dump_to = dump_to
        self._lock = threading.Lock()

    def install(self) -> AwsCallCounter:
        client_class: Any = botocore.client.BaseClient
        original = client_class._make_api_call
        counter = self

        def counting(client: Any, operation_name: str, api_params: dict[str, object]) -> object:
            counter._record(f"{client.meta.service_model.service_name}.{operation_name}")
            return original(client, operation_name, api_params)

        client_class._make_api_call = counting
        return self

    def _record(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
            if self._dump_to is not None:
                self._dump_to.write_text(json.dumps(self.counts))
