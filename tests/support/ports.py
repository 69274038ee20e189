"""Ports on the loopback interface for the servers and stacks the tests (and the benchmark) start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it; another process may still grab it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def accepts_connections(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something listens on ``host:port`` now."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
