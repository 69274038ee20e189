#!/usr/bin/env python3
"""A rate-limited HTTP API that keeps score: the server side of ``make bench`` (issue 3).

Stdlib only (plus the project's ``include/demo_api.TokenBucket``). It listens on 127.0.0.1,
limits every ``GET /bench/...`` request with ONE limit shared by all clients (the way a
gateway in front of a real API sees a fleet of workers), and records every request so a
benchmark can say how politely it was treated.

Two API shapes (chosen at start or at each ``/__bench/reset``):

``token_bucket``
    ``rate`` tokens per second, at most ``burst`` stored. Every limited response carries the
    IETF draft headers ``RateLimit-Limit: B``, ``RateLimit-Remaining``, ``RateLimit-Reset``
    (whole seconds until the next token) and ``RateLimit-Policy: B;w=W`` with ``W = B / rate``
    (rounded up to whole seconds when it is not whole). A refusal is ``429`` with
    ``Retry-After`` = seconds to the next token, rounded up, at least 1.
``fixed_window``
    ``window_limit`` requests per ``window_s`` seconds for everyone; windows are aligned to
    the whole second of the first request. GitHub-style ``X-RateLimit-Limit``,
    ``X-RateLimit-Remaining``, ``X-RateLimit-Used`` and ``X-RateLimit-Reset`` (epoch
    seconds of the window's end) on every limited response; a refusal is ``429`` with
    ``Retry-After`` = seconds to the window's end, rounded up, at least 1.

What is recorded and how it is judged (see :func:`summarize`):

* every limited request: arrival time (epoch seconds), client id (``X-Bench-Client`` header,
  else the path: the benchmark DAGs give every task its own path), path, status;
* **announcements**: a 429 announces ``not_before = arrival + Retry-After``; a 2xx that leaves
  the quota at 0 announces ``not_before = arrival + RateLimit-Reset`` (token bucket) or the
  window end (fixed window), because that is when the headers say the next request may go;
* a request is **early** when it arrives before the latest ``not_before`` announced so far
  to anyone (the limit is global, so the announcement is too), and **early_own** when it
  arrives before the latest one announced to its own client. A request that arrives early
  and still gets a token is still early: the rule is what the server said, not luck;
* **lateness**: for the first request a client sends after a 429, ``arrival - not_before``
  of that 429 (negative when early).

Control endpoints (never limited, never recorded):

``GET /__bench/health``
    ``{"ok": true}``.
``GET /__bench/stats``
    ``{"config": {...}, "summary": {...}, "requests": [...]}``; ``?records=0`` leaves out
    ``requests``.
``POST /__bench/reset``
    Forget every record and announcement and start a fresh limiter (a full bucket, no
    window yet). An optional JSON body changes the config: any of ``shape``, ``rate``,
    ``burst``, ``window_limit``, ``window_s``. Answers the config now in force.

Run it::

    python bench/rate_limited_server.py --shape token_bucket --rate 1 --burst 5 --port 0 \\
        --ready-file /tmp/ready.json     # port 0 picks a free port, written to the ready file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `include.demo_api` importable
    sys.path.insert(0, str(REPO))

from include.demo_api import TokenBucket  # noqa: E402

__all__ = [
    "LimiterConfig",
    "RateLimitedServer",
    "Recorder",
    "SHAPES",
    "make_limiter",
    "make_server",
    "percentile",
    "summarize",
]

SHAPES = ("token_bucket", "fixed_window")
LIMITED_PREFIX = "/bench/"
CONTROL_PREFIX = "/__bench/"
MAX_CONTROL_BODY_BYTES = 64 * 1024

Clock = Callable[[], float]


# --------------------------------------------------------------------------
# Limiters: pure decisions, the clock passed in.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LimiterConfig:
    """The API shape and its numbers. ``rate``/``burst`` are for the token bucket,
    ``window_limit``/``window_s`` for the fixed window."""

    shape: str = "token_bucket"
    rate: float = 1.0
    burst: int = 5
    window_limit: int = 20
    window_s: int = 20

    def validated(self) -> LimiterConfig:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if not self.rate > 0 or not math.isfinite(self.rate):
            raise ValueError(f"rate must be > 0, got {self.rate!r}")
        if int(self.burst) != self.burst or self.burst < 1:
            raise ValueError(f"burst must be a whole number >= 1, got {self.burst!r}")
        if int(self.window_limit) != self.window_limit or self.window_limit < 1:
            raise ValueError(f"window_limit must be a whole number >= 1, got {self.window_limit!r}")
        # Whole seconds, so that X-RateLimit-Reset (epoch seconds) is the exact window end.
        if int(self.window_s) != self.window_s or self.window_s < 1:
            raise ValueError(f"window_s must be a whole number of seconds >= 1, got {self.window_s!r}")
        return replace(self, burst=int(self.burst), window_limit=int(self.window_limit), window_s=int(self.window_s))

    @property
    def average_rate(self) -> float:
        """Requests per second the limit allows in the long run."""
        return self.rate if self.shape == "token_bucket" else self.window_limit / self.window_s


@dataclass(frozen=True)
class LimitDecision:
    """One limiter decision: the status, the headers, and what it told the client."""

    allowed: bool
    headers: dict[str, str]
    #: The moment (epoch seconds) these headers say the next request may be sent, when they
    #: say one: a 429's Retry-After, or the reset of a quota this request just used up.
    not_before: float | None


class Limiter(Protocol):
    def decide(self, now: float) -> LimitDecision: ...


def _whole_seconds_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(math.ceil(seconds))


class TokenBucketLimiter:
    """``include/demo_api.TokenBucket`` with IETF draft RateLimit-* headers."""

    def __init__(self, rate: float, burst: int) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.policy = f"{burst};w={_whole_seconds_header(burst / rate)}"

    def decide(self, now: float) -> LimitDecision:
        decision = self.bucket.try_acquire(now)
        headers = {
            "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": str(decision.remaining),
            "RateLimit-Reset": str(decision.reset_s),
            "RateLimit-Policy": self.policy,
        }
        if not decision.allowed:
            headers["Retry-After"] = str(decision.retry_after_s)
            return LimitDecision(False, headers, now + decision.retry_after_s)
        not_before = now + decision.reset_s if decision.remaining == 0 else None
        return LimitDecision(True, headers, not_before)


class FixedWindowLimiter:
    """``limit`` requests per ``window_s`` seconds, GitHub-style X-RateLimit-* headers."""

    def __init__(self, limit: int, window_s: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self._anchor: int | None = None  # whole epoch second the first window starts at
        self._window_index = -1
        self._used = 0
        self._lock = threading.Lock()

    def decide(self, now: float) -> LimitDecision:
        with self._lock:
            if self._anchor is None:
                self._anchor = math.floor(now)
            index = max(0, math.floor((now - self._anchor) / self.window_s))
            if index != self._window_index:
                self._window_index, self._used = index, 0
            window_end = self._anchor + (index + 1) * self.window_s
            allowed = self._used < self.limit
            if allowed:
                self._used += 1
            used = self._used
        remaining = self.limit - used
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Used": str(used),
            "X-RateLimit-Reset": str(window_end),
            "X-RateLimit-Resource": "bench",
        }
        if not allowed:
            retry_after = max(1, math.ceil(window_end - now))
            headers["Retry-After"] = str(retry_after)
            return LimitDecision(False, headers, now + retry_after)
        return LimitDecision(True, headers, float(window_end) if remaining == 0 else None)


def make_limiter(config: LimiterConfig) -> Limiter:
    config = config.validated()
    if config.shape == "token_bucket":
        return TokenBucketLimiter(config.rate, config.burst)
    return FixedWindowLimiter(config.window_limit, config.window_s)


# --------------------------------------------------------------------------
# Recording and judging.
# --------------------------------------------------------------------------


@dataclass
class Recorder:
    """Decides each limited request and records it, under one lock, so that "early" is
    judged against exactly the announcements made before the request arrived."""

    limiter: Limiter
    clock: Clock = time.time
    records: list[dict[str, Any]] = field(default_factory=list)
    _global_not_before: float = float("-inf")
    _client_not_before: dict[str, float] = field(default_factory=dict)
    _pending_retry: dict[str, float] = field(default_factory=dict)  # client -> not_before of its 429
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, client: str, path: str) -> LimitDecision:
        with self._lock:
            now = self.clock()
            early = now < self._global_not_before
            early_own = now < self._client_not_before.get(client, float("-inf"))
            promised = self._pending_retry.pop(client, None)
            decision = self.limiter.decide(now)
            status = 200 if decision.allowed else 429
            if decision.not_before is not None:
                self._global_not_before = max(self._global_not_before, decision.not_before)
                self._client_not_before[client] = max(
                    self._client_not_before.get(client, float("-inf")), decision.not_before
                )
            if not decision.allowed:
                self._pending_retry[client] = decision.not_before
            self.records.append(
                {
                    "t": now,
                    "client": client,
                    "path": path,
                    "status": status,
                    "early": early,
                    "early_own": early_own,
                    "lateness_s": None if promised is None else now - promised,
                    "not_before": decision.not_before,
                }
            )
        return decision

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(record) for record in self.records]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the records of one run. Keys a caller may rely on:

    ``requests_total``, ``responses_2xx``, ``duplicate_successes`` (2xx to a client that
    already had one: a request sent twice), ``responses_429``, ``early_requests``,
    ``early_requests_own``, ``retries_after_429`` (lateness samples), ``lateness_p50_s``,
    ``lateness_p95_s``, ``lateness_max_s``, ``first_request_at``, ``last_success_at`` (epoch
    seconds or ``None``), ``makespan_s`` (first request to last 2xx, ``None`` without one),
    ``clients_succeeded``, ``wait_after_429_s`` (sum over 429s of the time until the same
    client's next request; includes waits spent outside any worker slot).
    """
    lateness = [r["lateness_s"] for r in records if r["lateness_s"] is not None]
    successes = [r for r in records if 200 <= r["status"] < 300]
    first = min((r["t"] for r in records), default=None)
    last_success = max((r["t"] for r in successes), default=None)

    wait_after_429 = 0.0
    last_429: dict[str, float] = {}
    for record in sorted(records, key=lambda r: r["t"]):
        started = last_429.pop(record["client"], None)
        if started is not None:
            wait_after_429 += record["t"] - started
        if record["status"] == 429:
            last_429[record["client"]] = record["t"]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "requests_total": len(records),
        "responses_2xx": len(successes),
        "duplicate_successes": len(successes) - len({r["client"] for r in successes}),
        "responses_429": sum(1 for r in records if r["status"] == 429),
        "early_requests": sum(1 for r in records if r["early"]),
        "early_requests_own": sum(1 for r in records if r["early_own"]),
        "retries_after_429": len(lateness),
        "lateness_p50_s": rounded(percentile(lateness, 50)),
        "lateness_p95_s": rounded(percentile(lateness, 95)),
        "lateness_max_s": rounded(max(lateness, default=None)),
        "first_request_at": first,
        "last_success_at": last_success,
        "makespan_s": rounded(None if first is None or last_success is None else last_success - first),
        "clients_succeeded": len({r["client"] for r in successes}),
        "wait_after_429_s": round(wait_after_429, 3),
    }


# --------------------------------------------------------------------------
# HTTP server.
# --------------------------------------------------------------------------


class RateLimitedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the config and the current :class:`Recorder`."""

    daemon_threads = True
    # The stdlib backlog of 5 drops SYNs when tasks fan out, costing a 1 s retransmit.
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], config: LimiterConfig, clock: Clock = time.time) -> None:
        self.clock = clock
        self.config = config.validated()
        self.recorder = Recorder(make_limiter(self.config), clock)
        self._reset_lock = threading.Lock()
        super().__init__(address, _Handler)

    def reset(self, changes: dict[str, Any] | None = None) -> LimiterConfig:
        """Forget everything; apply ``changes`` to the config first (ValueError if invalid)."""
        allowed = set(LimiterConfig.__dataclass_fields__)
        unknown = set(changes or {}) - allowed
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        with self._reset_lock:
            config = replace(self.config, **(changes or {})).validated()
            self.config, self.recorder = config, Recorder(make_limiter(config), self.clock)
        return config

    def stats(self, with_records: bool = True) -> dict[str, Any]:
        records = self.recorder.snapshot()
        body: dict[str, Any] = {
            "config": {**asdict(self.config), "average_rate": self.config.average_rate},
            "summary": summarize(records),
        }
        if with_records:
            body["requests"] = records
        return body


class _Handler(BaseHTTPRequestHandler):
    server: RateLimitedServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response has Content-Length
    server_version = "BenchRateLimited/1.0"

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if path.startswith(CONTROL_PREFIX):
            self._control(method, path, parts.query)
        elif path.startswith(LIMITED_PREFIX):
            if method != "GET":
                self._send(405, {"error": "method not allowed"}, {"Allow": "GET"})
                return
            client = self.headers.get("X-Bench-Client") or path
            decision = self.server.recorder.handle(client, path)
            if decision.allowed:
                self._send(200, {"path": path, "ok": True}, decision.headers)
            else:
                retry_after = decision.headers["Retry-After"]
                self._send(429, {"error": "rate limited", "retry_after": int(retry_after)}, decision.headers)
        else:
            self._send(404, {"error": "not found"})

    def _control(self, method: str, path: str, query: str) -> None:
        if path == "/__bench/health" and method == "GET":
            self._send(200, {"ok": True})
        elif path == "/__bench/stats" and method == "GET":
            with_records = parse_qs(query).get("records", ["1"])[0] not in ("0", "false")
            self._send(200, self.server.stats(with_records))
        elif path == "/__bench/reset" and method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_CONTROL_BODY_BYTES:
                self._send(413, {"error": "body too large"})
                return
            raw = self.rfile.read(length) if length else b""
            try:
                changes = json.loads(raw) if raw.strip() else {}
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                config = self.server.reset(changes)
            except (ValueError, TypeError) as error:
                self._send(400, {"error": str(error)})
                return
            self._send(200, {"config": asdict(config)})
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # every request is recorded in /__bench/stats; a line per request is noise


def make_server(host: str = "127.0.0.1", port: int = 0, config: LimiterConfig | None = None) -> RateLimitedServer:
    """Bind (port 0 picks a free port; see ``server.server_address``) without serving yet."""
    return RateLimitedServer((host, port), config or LimiterConfig())


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


class _Stop(BaseException):
    """A BaseException, like KeyboardInterrupt: socketserver swallows any Exception
    raised while it accepts a request, so a signal landing there would be ignored."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--shape", choices=SHAPES, default="token_bucket")
    parser.add_argument("--rate", type=float, default=1.0, help="token bucket: tokens per second")
    parser.add_argument("--burst", type=int, default=5, help="token bucket: capacity")
    parser.add_argument("--window-limit", type=int, default=20, help="fixed window: requests per window")
    parser.add_argument("--window-seconds", type=int, default=20, help="fixed window: window length")
    parser.add_argument("--ready-file", type=Path, help="write {host, port, pid} here once listening")
    args = parser.parse_args(argv)

    config = LimiterConfig(args.shape, args.rate, args.burst, args.window_limit, args.window_seconds)
    try:
        server = make_server(args.host, args.port, config)
    except (ValueError, OSError) as error:
        print(f"rate_limited_server: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    host, port = server.server_address[:2]
    if args.ready_file:
        # Write-then-rename: a reader never sees half a file.
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
        tmp.replace(args.ready_file)
    print(f"rate_limited_server: http://{host}:{port} {asdict(server.config)}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except _Stop:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
