"""A rate-limited API for the multi-process gate test: fixed windows, blocks, and a score.

One limit for every client (as a gateway in front of a real API sees a fleet of workers):

- **windows**: ``limit`` requests per ``window_s`` seconds, windows on a fixed grid of epoch
  seconds. Every answer carries ``X-RateLimit-Limit``, ``-Remaining``, ``-Used`` and
  ``-Reset`` (epoch seconds of the window's end), and ``Date``. Spending the last request
  of a window announces "nothing before the window's end".
- **blocks**: every ``block_every``-th window whose last request leaves at least
  ``block_margin_s`` of the window, that last request is answered ``429`` with only a
  ``Retry-After`` reaching ``block_extra_s`` seconds past the window's end, and the server
  refuses everything until then. The gate has let out nothing else by then (that request
  spent the window's quota), so a correct client has nothing in flight that could arrive
  early; the margin leaves the client time to record the block before the holders of the
  next window's send times wake up.
- a request over the limit, or during a block, is a ``429`` with ``Retry-After`` (a
  violation; it is counted as early too).

A request is **early** when it arrives before the latest time any answer so far told not to
send before (``not_before``): the limit is shared, so is the announcement. Judged under one
lock, against exactly the announcements made before the request arrived.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LIMITED_PATH = "/limited"
CLIENT_HEADER = "X-Gate-Client"


@dataclass(frozen=True)
class Early:
    client: str
    arrived: float
    not_before: float
    told: str  # what announced it: "window" or "block"

    @property
    def early_by(self) -> float:
        return self.not_before - self.arrived


@dataclass
class WindowedApi:
    """The limiter and its score; ``handle`` is the whole decision, the clock injected."""

    limit: int = 4
    window_s: int = 2
    block_every: int = 2
    block_extra_s: int = 1
    block_margin_s: float = 0.5
    clock: Callable[[], float] = time.time

    requests: int = 0
    answered_200: int = 0
    answered_429: int = 0
    windows_spent: int = 0  # 200s that announced remaining 0 until the window's end
    blocks: int = 0  # 429s that announced a block
    violations: int = 0  # 429s for a request over the limit or inside a block
    early: list[Early] = field(default_factory=list)
    #: (arrived, client, status, what the answer said), for failure messages.
    exchanges: list[tuple[float, str, int, str]] = field(default_factory=list)
    _not_before: float = float("-inf")
    _told: str = ""
    _blocked_until: float = float("-inf")
    _window_start: float | None = None
    _used: int = 0
    _spent_windows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, client: str) -> tuple[int, dict[str, str]]:
        with self._lock:
            now = self.clock()
            status, headers = self._decide(client, now)
            said = ", ".join(f"{k.removeprefix('X-RateLimit-')}={v}" for k, v in headers.items() if k != "X-RateLimit-Limit")
            self.exchanges.append((now, client, status, said))
            return status, headers

    def _decide(self, client: str, now: float) -> tuple[int, dict[str, str]]:
        self.requests += 1
        if now < self._not_before:
            self.early.append(Early(client, now, self._not_before, self._told))
        window_start = math.floor(now / self.window_s) * self.window_s
        window_end = window_start + self.window_s
        if window_start != self._window_start:
            self._window_start, self._used = window_start, 0
        if now < self._blocked_until:
            self.violations += 1
            return self._refuse(now, math.ceil(self._blocked_until - now), "block")
        if self._used >= self.limit:
            self.violations += 1
            return self._refuse(now, max(1, math.ceil(window_end - now)), "window")
        self._used += 1
        remaining = self.limit - self._used
        if remaining == 0:
            self._spent_windows += 1
            if self._spent_windows % self.block_every == 0 and window_end - now >= self.block_margin_s:
                self.blocks += 1
                retry_after = math.ceil(window_end - now) + self.block_extra_s
                self._blocked_until = now + retry_after
                return self._refuse(now, retry_after, "block")
            self.windows_spent += 1
            self._announce(window_end, "window")
        self.answered_200 += 1
        return 200, {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Used": str(self._used),
            "X-RateLimit-Reset": str(int(window_end)),
        }

    def _refuse(self, now: float, retry_after: int, told: str) -> tuple[int, dict[str, str]]:
        self.answered_429 += 1
        self._announce(now + retry_after, told)
        return 429, {"Retry-After": str(retry_after)}

    def _announce(self, not_before: float, told: str) -> None:
        if not_before > self._not_before:
            self._not_before, self._told = not_before, told

    def timeline(self) -> str:
        """Every exchange, one a line, seconds from the first."""
        with self._lock:
            if not self.exchanges:
                return "(no requests)"
            start = self.exchanges[0][0]
            return "\n".join(f"{t - start:8.3f}s {client:>4} {status} {said}" for t, client, status, said in self.exchanges)

    def score(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "answered_200": self.answered_200,
                "answered_429": self.answered_429,
                "windows_spent": self.windows_spent,
                "blocks": self.blocks,
                "violations": self.violations,
                "early": len(self.early),
                "max_early_by_s": round(max((e.early_by for e in self.early), default=0.0), 3),
            }


class GateApiServer:
    """:class:`WindowedApi` over HTTP on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, api: WindowedApi) -> None:
        self.api = api
        server_api = api

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path != LIMITED_PATH:
                    self._answer(404, {}, {"error": "not found"})
                    return
                status, headers = server_api.handle(self.headers.get(CLIENT_HEADER, "?"))
                self._answer(status, headers, {"ok": status == 200})

            def _answer(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)  # also sends Date
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="gate-api", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> GateApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
