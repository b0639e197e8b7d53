"""Unit tests run with the network off: any attempt to open an IP connection fails the test."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.fakes import KeyClock, MemoryApiKeyStore


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkBlocked(f"unit tests must not use the network (tried {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def clock() -> KeyClock:
    return KeyClock()


@pytest.fixture
def store() -> MemoryApiKeyStore:
    return MemoryApiKeyStore()
