"""Checks shared by the tests of this project's HTTP servers (the demo API, the bench API)."""

from __future__ import annotations

import socket
from typing import Any

import pytest


def assert_a_stop_raised_while_accepting_leaves_the_loop(monkeypatch: Any, server: Any, stop: BaseException) -> None:
    """A stop signal's exception raised inside ``process_request`` must leave the serve loop.

    socketserver reports and swallows any ``Exception`` raised while it accepts a request;
    CI once saw a SIGTERM land there and the server keep serving.
    """

    def stop_now(request, client_address):
        raise stop

    monkeypatch.setattr(server, "process_request", stop_now)
    try:
        client = socket.create_connection(server.server_address[:2], timeout=5)
        try:
            with pytest.raises(type(stop)):
                server.handle_request()
        finally:
            client.close()
    finally:
        server.server_close()
