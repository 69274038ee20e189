"""A small rate-limited demo JSON API, stdlib only.

The project's DAGs fetch from this server by default, so a developer can watch
rate limiting (HTTP 429 + Retry-After) happen without touching a real service.

Run it:

    python include/demo_api.py --host 127.0.0.1 --port 8090 --rate 0.2 --burst 3

Or embed it (tests do this, on port 0):

    server = make_server("127.0.0.1", 0, rate=100, burst=10)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

Rate limit: one global token bucket shared by every /api/* request (the way a
gateway in front of a real API would see it). /health and /stats are never
limited, so probes and dashboards cannot starve the clients under test.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DATA_ENDPOINTS",
    "Decision",
    "DemoApiServer",
    "MAX_SLOW_SECONDS",
    "Stats",
    "TokenBucket",
    "main",
    "make_server",
    "retry_after_seconds",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
# Tight on purpose: a periodic run that fetches ~6 endpoints at once gets 3
# answers, then 429s, and must honour Retry-After to finish.
# One request every 5 s after a burst of 3: the periodic DAG's six requests at once run
# into it, so the first run shows tasks waiting (deferred) in the UI.
DEFAULT_RATE_PER_S = 0.2
DEFAULT_BURST = 3

MAX_SLOW_SECONDS = 30.0
MAX_BODY_BYTES = 1024 * 1024

# Float arithmetic on monotonic timestamps (e.g. (t + 10.0) - t == 9.99999...)
# can leave a bucket a hair below one token at the exact moment Retry-After
# promised one. Treating "within a millionth of a token" as a whole token keeps
# that promise; the extra capacity it grants is negligible.
TOKEN_EPSILON = 1e-6

log = logging.getLogger("demo_api")

Clock = Callable[[], float]


# --------------------------------------------------------------------------
# Token bucket: pure arithmetic plus a thin stateful wrapper.
# --------------------------------------------------------------------------


def refilled_tokens(tokens: float, elapsed_s: float, rate_per_s: float, burst: int) -> float:
    """Tokens in the bucket after `elapsed_s` more seconds of refilling."""
    # A clock that steps backwards (or two threads reading it out of order)
    # must not drain the bucket, hence max(0, ...).
    return min(float(burst), tokens + max(0.0, elapsed_s) * rate_per_s)


def seconds_until_tokens(tokens: float, wanted: float, rate_per_s: float) -> float:
    """Seconds of refilling before the bucket holds `wanted` tokens (0 if it already does)."""
    missing = wanted - tokens
    return 0.0 if missing <= TOKEN_EPSILON else missing / rate_per_s


def retry_after_seconds(wait_s: float) -> int:
    """Integer delta-seconds for a Retry-After header.

    Rounded *up*, so a client that sleeps exactly this long finds a token;
    at least 1, because "Retry-After: 0" invites a hot retry loop.
    """
    return max(1, math.ceil(wait_s))


@dataclass(frozen=True)
class Decision:
    """The outcome of asking the bucket for one token."""

    allowed: bool
    limit: int
    # Whole tokens left after this decision (what RateLimit-Remaining shows).
    remaining: int
    # Seconds until the bucket gains its next whole token; 0.0 when it is full.
    seconds_until_next_token: float

    @property
    def retry_after_s(self) -> int:
        """Value for Retry-After (meaningful when refused)."""
        return retry_after_seconds(self.seconds_until_next_token)

    @property
    def reset_s(self) -> int:
        """Value for RateLimit-Reset: when the next token arrives, in whole seconds."""
        if not self.allowed:
            return self.retry_after_s
        return math.ceil(self.seconds_until_next_token)


class TokenBucket:
    """A token bucket holding up to `burst` tokens, refilled at `rate_per_s`.

    It starts full. `try_acquire(now)` takes one token if there is one; pass
    `now` explicitly for deterministic tests, or omit it to read `clock`.
    A refused request changes nothing, so a crowd of refused clients cannot
    push the next token further away.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.clock = clock
        self._tokens = float(burst)
        self._updated_at: float | None = None  # first decision anchors the timeline
        self._lock = threading.Lock()

    def try_acquire(self, now: float | None = None) -> Decision:
        with self._lock:
            # Read the clock under the lock so concurrent callers see time in order.
            if now is None:
                now = self.clock()
            tokens = self._tokens_at(now)
            if tokens + TOKEN_EPSILON < 1.0:
                return Decision(
                    allowed=False,
                    limit=self.burst,
                    remaining=0,
                    seconds_until_next_token=seconds_until_tokens(tokens, 1.0, self.rate_per_s),
                )
            tokens = max(0.0, tokens - 1.0)
            self._tokens, self._updated_at = tokens, now
            return Decision(
                allowed=True,
                limit=self.burst,
                remaining=math.floor(tokens + TOKEN_EPSILON),
                seconds_until_next_token=self._seconds_until_next_whole_token(tokens),
            )

    def _tokens_at(self, now: float) -> float:
        if self._updated_at is None:
            return self._tokens
        return refilled_tokens(self._tokens, now - self._updated_at, self.rate_per_s, self.burst)

    def _seconds_until_next_whole_token(self, tokens: float) -> float:
        if tokens + TOKEN_EPSILON >= self.burst:
            return 0.0
        next_whole = math.floor(tokens + TOKEN_EPSILON) + 1
        return seconds_until_tokens(tokens, next_whole, self.rate_per_s)


# --------------------------------------------------------------------------
# Request statistics.
# --------------------------------------------------------------------------


class Stats:
    """Thread-safe counters of completed responses, served at GET /stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_status: dict[int, int] = {}

    def record(self, status: int) -> None:
        with self._lock:
            self._by_status[status] = self._by_status.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            by_status = dict(self._by_status)
        return {
            "requests_total": sum(by_status.values()),
            "responses_2xx": sum(n for status, n in by_status.items() if 200 <= status < 300),
            "responses_429": by_status.get(429, 0),
            "responses_by_status": {str(status): n for status, n in sorted(by_status.items())},
        }


# --------------------------------------------------------------------------
# Deterministic documents.
# --------------------------------------------------------------------------


def _users() -> list[dict[str, Any]]:
    return [
        {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com"},
        {"id": 2, "name": "Grace Hopper", "email": "grace@example.com"},
        {"id": 3, "name": "Alan Turing", "email": "alan@example.com"},
    ]


def _orders() -> list[dict[str, Any]]:
    return [
        {"id": 101, "user_id": 1, "total": 42.5, "status": "shipped"},
        {"id": 102, "user_id": 2, "total": 13.0, "status": "pending"},
        {"id": 103, "user_id": 1, "total": 7.25, "status": "delivered"},
    ]


def _products() -> list[dict[str, Any]]:
    return [
        {"sku": "WID-1", "name": "Widget", "price": 9.99},
        {"sku": "GAD-2", "name": "Gadget", "price": 24.5},
        {"sku": "DOO-3", "name": "Doohickey", "price": 3.75},
    ]


def _inventory() -> list[dict[str, Any]]:
    return [
        {"sku": "WID-1", "warehouse": "north", "quantity": 120},
        {"sku": "GAD-2", "warehouse": "north", "quantity": 8},
        {"sku": "DOO-3", "warehouse": "south", "quantity": 0},
    ]


def _weather() -> list[dict[str, Any]]:
    return [
        {"city": "Amsterdam", "temperature_c": 11.5, "conditions": "rain"},
        {"city": "Lisbon", "temperature_c": 19.0, "conditions": "sunny"},
        {"city": "Oslo", "temperature_c": 2.5, "conditions": "snow"},
    ]


def _exchange_rates() -> list[dict[str, Any]]:
    return [
        {"base": "EUR", "quote": "USD", "rate": 1.08},
        {"base": "EUR", "quote": "GBP", "rate": 0.86},
        {"base": "EUR", "quote": "JPY", "rate": 161.2},
    ]


# Endpoint name -> deterministic payload. The DAGs iterate over these names.
DATA_ENDPOINTS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "users": _users,
    "orders": _orders,
    "products": _products,
    "inventory": _inventory,
    "weather": _weather,
    "exchange-rates": _exchange_rates,
}

_ITEM_PATH = re.compile(r"^/api/items/(\d+)$")


def item_document(item_id: int) -> dict[str, Any]:
    """A deterministic item, derived from its id alone."""
    return {"id": item_id, "name": f"item-{item_id}", "price": round((item_id * 37 % 1000) / 10, 2)}


def parse_slow_seconds(query: str) -> float:
    """Seconds /api/slow should sleep: ?seconds=N, clamped to [0, MAX_SLOW_SECONDS]."""
    values = parse_qs(query).get("seconds", ["0"])
    seconds = float(values[0])  # ValueError -> 400 in the handler
    if math.isnan(seconds):
        raise ValueError("seconds is NaN")
    return min(max(seconds, 0.0), MAX_SLOW_SECONDS)


def utc_timestamp(wall_clock: Clock) -> str:
    return datetime.fromtimestamp(wall_clock(), tz=timezone.utc).isoformat()


# --------------------------------------------------------------------------
# HTTP server.
# --------------------------------------------------------------------------


class DemoApiServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the shared bucket, stats and clocks."""

    daemon_threads = True
    # The stdlib backlog of 5 drops SYNs when a client fans out, costing a 1 s retransmit.
    request_queue_size = 64
    # Quick restarts of the CLI must not fail with "address already in use".
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        bucket: TokenBucket,
        wall_clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bucket = bucket
        self.stats = Stats()
        self.wall_clock = wall_clock
        self.sleep = sleep
        super().__init__(address, DemoApiHandler)


class _HttpError(Exception):
    def __init__(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.payload = payload
        self.headers = headers or {}


class DemoApiHandler(BaseHTTPRequestHandler):
    server: DemoApiServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "DemoApi/1.0"

    # One entry point for every method so routing (404 vs 405) lives in one place.
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        extra_headers: dict[str, str] = {}
        try:
            # Drain the body first: answering early would leave it in the
            # keep-alive stream, where it would be parsed as the next request.
            body = self._read_body()
            if path.startswith("/api/"):
                decision = self.server.bucket.try_acquire()
                extra_headers = _rate_limit_headers(decision, self.server.bucket)
                if not decision.allowed:
                    raise _HttpError(
                        429,
                        {"error": "rate limited", "retry_after": decision.retry_after_s},
                        {"Retry-After": str(decision.retry_after_s)},
                    )
            status, payload = self._route(path, url.query, body)
        except _HttpError as error:
            status, payload = error.status, error.payload
            extra_headers.update(error.headers)
        self._send_json(status, payload, extra_headers)

    def _route(self, path: str, query: str, body: bytes) -> tuple[int, Any]:
        method = self.command
        if path == "/health":
            _require_method(method, {"GET", "HEAD"})
            return 200, {"status": "ok"}
        if path == "/stats":
            _require_method(method, {"GET", "HEAD"})
            return 200, self.server.stats.snapshot()
        if path.startswith("/api/") and path[len("/api/"):] in DATA_ENDPOINTS:
            _require_method(method, {"GET", "HEAD"})
            name = path[len("/api/"):]
            return 200, {
                "endpoint": name,
                "server_time": utc_timestamp(self.server.wall_clock),
                "data": DATA_ENDPOINTS[name](),
            }
        if match := _ITEM_PATH.match(path):
            _require_method(method, {"GET", "HEAD"})
            return 200, {
                "endpoint": "items",
                "server_time": utc_timestamp(self.server.wall_clock),
                "item": item_document(int(match.group(1))),
            }
        if path == "/api/echo":
            _require_method(method, {"POST", "PUT", "PATCH"})
            try:
                return 200, json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _HttpError(400, {"error": "invalid JSON", "detail": str(exc)}) from exc
        if path == "/api/slow":
            _require_method(method, {"GET", "HEAD"})
            try:
                seconds = parse_slow_seconds(query)
            except ValueError as exc:
                raise _HttpError(400, {"error": "invalid seconds", "detail": str(exc)}) from exc
            self.server.sleep(seconds)
            return 200, {
                "endpoint": "slow",
                "slept_s": seconds,
                "server_time": utc_timestamp(self.server.wall_clock),
            }
        raise _HttpError(404, {"error": "not found", "path": path})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # Rare from real clients; refusing and closing is simpler than decoding.
            self.close_connection = True
            raise _HttpError(411, {"error": "length required"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _HttpError(400, {"error": "invalid Content-Length"}) from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _HttpError(413, {"error": "body too large", "max_bytes": MAX_BODY_BYTES})
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_response(self, code: int, message: str | None = None) -> None:
        # Every answer, including the stdlib's own 400/501 errors, passes here.
        self.server.stats.record(code)
        super().send_response(code, message)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info('%s "%s" %s', self.client_address[0], self.requestline, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("%s %s", self.client_address[0], format % args)


def _require_method(method: str, allowed: set[str]) -> None:
    if method not in allowed:
        raise _HttpError(
            405,
            {"error": "method not allowed", "method": method, "allowed": sorted(allowed)},
            {"Allow": ", ".join(sorted(allowed))},
        )


def _rate_limit_headers(decision: Decision, bucket: TokenBucket) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(decision.reset_s),
        # IETF draft-ietf-httpapi-ratelimit-headers: `quota;w=window` states the average
        # rate (burst tokens per burst/rate seconds), so clients can pace themselves.
        "RateLimit-Policy": policy_header(bucket.rate_per_s, bucket.burst),
    }


def policy_header(rate_per_s: float, burst: int) -> str:
    """``RateLimit-Policy`` for a token bucket; the window is rounded up, so it never overstates the rate."""
    return f"{burst};w={max(math.ceil(burst / rate_per_s), 1)}"


def make_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    rate: float = DEFAULT_RATE_PER_S,
    burst: int = DEFAULT_BURST,
    clock: Clock = time.monotonic,
    *,
    wall_clock: Clock = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> DemoApiServer:
    """Bind (port 0 picks a free port; see server.server_address) without serving yet."""
    return DemoApiServer((host, port), TokenBucket(rate, burst, clock), wall_clock=wall_clock, sleep=sleep)


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Rate-limited demo JSON API.")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S, help="tokens per second")
    parser.add_argument("--burst", type=int, default=DEFAULT_BURST, help="bucket capacity")
    return parser.parse_args(argv)


class _StopRequested(BaseException):
    """Raised by the SIGTERM/SIGINT handler to leave serve_forever().

    A BaseException, like KeyboardInterrupt: socketserver reports and swallows any
    Exception raised while it accepts a request, so a signal landing there would
    otherwise be printed and ignored, and the server would keep serving.
    """


def _raise_stop_requested(signum: int, _frame: Any) -> None:
    raise _StopRequested(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        server = make_server(args.host, args.port, args.rate, args.burst)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1

    # Raising from the handler unwinds serve_forever() on the main thread; calling
    # server.shutdown() there instead would deadlock (it waits for that very loop).
    signal.signal(signal.SIGTERM, _raise_stop_requested)
    signal.signal(signal.SIGINT, _raise_stop_requested)
    host, port = server.server_address[:2]
    log.info("demo API listening on http://%s:%s (rate=%s/s, burst=%s)", host, port, args.rate, args.burst)
    try:
        server.serve_forever()
    except _StopRequested as stop:
        log.info("received %s, shutting down", stop)
    finally:
        server.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
