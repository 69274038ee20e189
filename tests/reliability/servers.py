"""HTTP servers of the reliability tests, in the test process on 127.0.0.1.

* ``RoutedApi``: tests/support/scripted_api.py's ``ScriptedApi`` with a script per path (many
  tasks of different cases share one server) and, optionally, a fixed port (a server that is
  "down" until the test starts it on the port its Connection names).
* ``StreamingApi``: answers that a scripted response cannot give: a huge body without
  ``Content-Length`` streamed as fast as the client reads, or a body that drips one byte at a
  time and never ends. It counts what it sent and sees when the client hangs up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.support.scripted_api import RecordedRequest, ScriptedApi, ScriptedResponse, _ScriptedHttpServer


class RoutedApi(ScriptedApi):
    """A ``ScriptedApi`` whose responses are queued per request path.

    ``route(path, *responses)`` queues answers for that path; when its queue is empty the
    path's ``sticky`` response (``route_default``) or the server default is played.
    """

    def __init__(self, port: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed_port = port
        self._routes: dict[str, deque[ScriptedResponse]] = {}
        self._route_defaults: dict[str, ScriptedResponse] = {}

    def start(self) -> RoutedApi:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _ScriptedHttpServer((self.host, self.fixed_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"routed-api-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def route(self, path: str, *responses: ScriptedResponse) -> RoutedApi:
        with self._lock:
            self._routes.setdefault(path, deque()).extend(responses)
        return self

    def route_default(self, path: str, response: ScriptedResponse) -> RoutedApi:
        with self._lock:
            self._route_defaults[path] = response
        return self

    def requests_for(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    def wait_for_path(self, path: str, count: int, timeout: float) -> list[RecordedRequest]:
        with self._request_arrived:
            if not self._request_arrived.wait_for(
                lambda: sum(1 for r in self._requests if r.path == path) >= count, timeout
            ):
                raise TimeoutError(f"expected {count} requests to {path} within {timeout}s, got {self.requests_for(path)}")
        return self.requests_for(path)

    def _record_and_pick_response(self, request: RecordedRequest) -> ScriptedResponse:
        with self._lock:
            queue = self._routes.get(request.path)
            if queue:
                response = queue.popleft()
            else:
                response = self._route_defaults.get(request.path, self._default_response)
            self._requests.append(replace(request, response=response))
            self._request_arrived.notify_all()
            return response


@dataclass
class Stream:
    """One streamed answer, as the server saw it."""

    path: str
    arrived: float  # time.time()
    client_port: int = 0
    bytes_sent: int = 0
    ended: float | None = None
    client_gone: bool = False
    #: With ``?hold=1`` the body waits for ``go`` (so a test can find the client process first).
    go: threading.Event = field(default_factory=threading.Event)
    #: Set it to end a drip (the server then closes the connection: the body is complete).
    stop: threading.Event = field(default_factory=threading.Event)


class StreamingApi:
    """``/huge?bytes=N`` streams N bytes (default 200 MiB) with no Content-Length as fast as the
    client reads; ``/drip?every=S`` sends one byte every S seconds (default 0.5) and never ends.
    Both close the connection at the end (``Connection: close``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.streams: list[Stream] = []
        self._stopping = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                stream = Stream(url.path, time.time(), client_port=self.client_address[1])
                with api._lock:
                    api.streams.append(stream)
                try:
                    self.send_response(200)
                    if url.path == "/huge":
                        self.send_header("Content-Type", "application/octet-stream")
                    else:
                        self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.flush()
                    if query.get("hold"):
                        stream.go.wait(30)
                    if url.path == "/huge":
                        total = int(query.get("bytes", 200 * 1024 * 1024))
                        chunk = b"x" * 65536
                        while stream.bytes_sent < total and not api._stopping.is_set():
                            piece = chunk[: total - stream.bytes_sent]
                            self.wfile.write(piece)
                            stream.bytes_sent += len(piece)
                    else:
                        every = float(query.get("every", 0.5))
                        while not (api._stopping.is_set() or stream.stop.wait(every)):
                            self.wfile.write(b".")
                            self.wfile.flush()
                            stream.bytes_sent += 1
                except OSError:
                    stream.client_gone = True
                finally:
                    stream.ended = time.time()
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def handle_error(self, request, client_address) -> None:
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> StreamingApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def streams_to(self, path: str) -> list[Stream]:
        with self._lock:
            return [s for s in self.streams if s.path == path]

    def wait_for_stream(self, path: str, count: int = 1, timeout: float = 60) -> list[Stream]:
        deadline = time.monotonic() + timeout
        while len(self.streams_to(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no request to {path} within {timeout}s")
            time.sleep(0.02)
        return self.streams_to(path)
