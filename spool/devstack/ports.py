"""The stack's listening sockets, bound before anything starts: a busy port is reported at once."""

from __future__ import annotations

import errno
import socket


class PortInUse(Exception):
    def __init__(self, host: str, port: int, variable: str | None) -> None:
        where = f" ({variable})" if variable else ""
        hint = f"; set {variable} to a free port" if variable else ""
        super().__init__(f"port {port} on {host}{where} is already in use{hint}")
        self.port = port
        self.variable = variable


def listen(host: str, port: int, variable: str | None = None, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = any free port); ``PortInUse`` if it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A restart must not wait for the last run's connections in TIME_WAIT (on Linux this never lets
    # two servers listen on one port).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise PortInUse(host, port, variable) from None
        raise
    sock.listen(backlog)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port free at the moment of asking (for tests that pass ports to a child; racy by nature)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
