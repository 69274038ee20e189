"""A scripted HTTP server for integration tests of HTTP clients and operators.

Queue the answers, point the code under test at `api.base_url`, then assert on
what it sent and when:

    with ScriptedApi() as api:
        api.script(
            ScriptedResponse.too_many_requests(retry_after=1),
            ScriptedResponse(body={"users": []}),
        )
        fetch(api.base_url + "/api/users")
        assert api.request_count == 2
        assert api.gaps()[0] >= 1.0

Responses are played in order to whatever request comes next (any method, any
path); once the script runs out, every request gets `default_response`.
Stdlib only, and independent of Airflow and of include/demo_api.py, so it can
test anything that speaks HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "RecordedRequest",
    "ScriptedApi",
    "ScriptedResponse",
    "free_port",
    "scripted_api_fixture",
]

Clock = Callable[[], float]
Body = bytes | str | dict | list

RESPOND, HANG, CLOSE = "respond", "hang", "close"
# Statuses whose responses must not carry a body (RFC 9110 §6.4.1).
_BODYLESS_STATUSES = frozenset({204, 304})


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may still grab it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ScriptedResponse:
    """One scripted answer.

    `body` may be bytes (sent as is), str (UTF-8 text) or dict/list (JSON with
    Content-Type application/json). Explicit `headers` win over those defaults.
    `delay_s` waits before answering; for `hang`/`close` it is how long to wait
    before dropping the connection.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Body = b""
    delay_s: float = 0.0
    action: str = RESPOND

    def __post_init__(self) -> None:
        if self.action not in (RESPOND, HANG, CLOSE):
            raise ValueError(f"unknown action {self.action!r}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s!r}")

    @classmethod
    def hang(cls, seconds: float) -> ScriptedResponse:
        """Accept the request, say nothing for `seconds`, then close the connection.

        Use it to exercise client read timeouts. `ScriptedApi.stop()` cuts a hang short.
        """
        return cls(action=HANG, delay_s=seconds)

    @classmethod
    def close(cls, after_s: float = 0.0) -> ScriptedResponse:
        """Read the request, then close the connection without any response bytes."""
        return cls(action=CLOSE, delay_s=after_s)

    @classmethod
    def too_many_requests(cls, retry_after: int | str | None = 1, body: Body | None = None) -> ScriptedResponse:
        """A 429, with Retry-After unless `retry_after` is None."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(status=429, headers=headers, body={"error": "rate limited"} if body is None else body)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        """The body bytes and the headers to send, defaults filled in."""
        headers = dict(self.headers)
        if isinstance(self.body, (dict, list)):
            payload, content_type = json.dumps(self.body).encode(), "application/json"
        elif isinstance(self.body, str):
            payload, content_type = self.body.encode(), "text/plain; charset=utf-8"
        else:
            payload, content_type = bytes(self.body), None
        if content_type and not _has_header(headers, "Content-Type"):
            headers["Content-Type"] = content_type
        return payload, headers


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the server received it."""

    method: str
    path: str  # without the query string
    query: str  # raw query string, "" if none
    headers: dict[str, str]
    body: bytes
    received_at: float  # wall clock (time.time), when the request head was parsed
    received_monotonic: float  # same instant on the monotonic clock; use it for gaps
    # The scripted answer this request was given (None if the body could not be read).
    response: ScriptedResponse | None = None

    @property
    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup (HTTP header names are case-insensitive)."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return default

    def json(self) -> Any:
        return json.loads(self.body)


def gaps_between(instants: list[float]) -> list[float]:
    """Seconds between consecutive instants, in time order."""
    ordered = sorted(instants)
    return [later - earlier for earlier, later in zip(ordered, ordered[1:])]


class ScriptedApi:
    """An HTTP server on 127.0.0.1 (free port) that plays scripted responses and records requests."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        default_response: ScriptedResponse | None = None,
        *,
        wall_clock: Clock = time.time,
        monotonic_clock: Clock = time.monotonic,
    ) -> None:
        self.host = host
        self._default_response = default_response or ScriptedResponse(body={"ok": True})
        self._wall_clock = wall_clock
        self._monotonic_clock = monotonic_clock
        self._lock = threading.Lock()
        self._script: deque[ScriptedResponse] = deque()
        self._requests: list[RecordedRequest] = []
        self._request_arrived = threading.Condition(self._lock)
        # Set by stop(): releases handlers sleeping in a delay or a hang.
        self._stopping = threading.Event()
        self._server: _ScriptedHttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> ScriptedApi:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _ScriptedHttpServer((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # quick stop()
            name=f"scripted-api-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        # Kick idle keep-alive connections too, so no handler thread outlives the test.
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ScriptedApi:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("ScriptedApi is not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # -- scripting ---------------------------------------------------------

    def script(self, *responses: ScriptedResponse) -> ScriptedApi:
        """Queue responses, played in order after any still queued."""
        with self._lock:
            self._script.extend(responses)
        return self

    @property
    def default_response(self) -> ScriptedResponse:
        return self._default_response

    @default_response.setter
    def default_response(self, response: ScriptedResponse) -> None:
        with self._lock:
            self._default_response = response

    @property
    def remaining_scripted(self) -> int:
        """Queued responses not played yet (0 once the script is used up)."""
        with self._lock:
            return len(self._script)

    def clear(self) -> None:
        """Forget recorded requests and queued responses (the default stays)."""
        with self._lock:
            self._script.clear()
            self._requests.clear()

    # -- inspection --------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot, in the order the responses were handed out."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def gaps(self) -> list[float]:
        """Seconds between consecutive requests (by arrival on the monotonic clock)."""
        return gaps_between([request.received_monotonic for request in self.requests])

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least `count` requests were recorded; TimeoutError otherwise."""
        with self._request_arrived:
            if not self._request_arrived.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"expected {count} requests within {timeout}s, got {len(self._requests)}")
            return list(self._requests)

    # -- used by the handler ----------------------------------------------

    def _now(self) -> tuple[float, float]:
        return self._wall_clock(), self._monotonic_clock()

    def _record_and_pick_response(self, request: RecordedRequest) -> ScriptedResponse:
        # One lock for both, so the n-th recorded request is the one that got the n-th response.
        with self._lock:
            response = self._script.popleft() if self._script else self._default_response
            self._requests.append(replace(request, response=response))
            self._request_arrived.notify_all()
            return response

    def _record_unreadable(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._request_arrived.notify_all()


def _has_header(headers: dict[str, str], name: str) -> bool:
    return any(key.lower() == name.lower() for key in headers)


def read_chunked_body(rfile: BinaryIO) -> bytes:
    """Decode a Transfer-Encoding: chunked body (trailers are read and dropped)."""
    chunks = []
    while True:
        size_line = rfile.readline(65537)
        size = int(size_line.split(b";", 1)[0].strip(), 16)  # ValueError on garbage
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        chunks.append(rfile.read(size))
        rfile.readline()  # the CRLF closing the chunk


class _ScriptedHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib backlog of 5 drops SYNs when a client fans out, costing a 1 s retransmit.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: ScriptedApi) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _ScriptedHandler)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up (timeouts, closed sockets) are the point of many tests: stay quiet.
        pass


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: _ScriptedHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "ScriptedApi/1.0"

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; answering every name
        # lets the script serve any method, even invented ones.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.untrack(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the client or stop() already closed the socket

    def _handle(self) -> None:
        api = self.server.api
        received_at, received_monotonic = api._now()
        url = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=url.path,
            query=url.query,
            headers=dict(self.headers.items()),
            body=b"",
            received_at=received_at,
            received_monotonic=received_monotonic,
        )
        try:
            body = self._read_body()
        except ValueError:
            api._record_unreadable(request)
            self.close_connection = True
            self.send_error(400, "unreadable request body")
            return
        response = api._record_and_pick_response(replace(request, body=body))
        try:
            self._play(response)
        except OSError:
            self.close_connection = True  # the client left mid-answer

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return read_chunked_body(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _play(self, response: ScriptedResponse) -> None:
        stopping = self.server.api._stopping
        if response.delay_s > 0 and stopping.wait(response.delay_s):
            self.close_connection = True  # stop() while waiting: don't answer
            return
        if response.action in (HANG, CLOSE):
            self.close_connection = True
            return
        payload, headers = response.encoded()
        bodyless = response.status in _BODYLESS_STATUSES or 100 <= response.status < 200
        self.send_response(response.status)
        for name, value in headers.items():
            self.send_header(name, value)  # "Connection: close" also sets close_connection
        if not bodyless and not _has_header(headers, "Content-Length"):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not bodyless and self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on .requests; access logs would only be noise


def scripted_api_fixture() -> Iterator[ScriptedApi]:
    """Generator for a pytest fixture: yields a started ScriptedApi, stops it afterwards.

    In conftest.py:

        scripted_api = pytest.fixture(scripted_api_fixture, name="scripted_api")
    """
    api = ScriptedApi().start()
    try:
        yield api
    finally:
        api.stop()
