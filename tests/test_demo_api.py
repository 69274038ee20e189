"""The demo API: its token bucket as pure arithmetic, then the real server on a free port."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The project root is not necessarily on sys.path under plain `pytest`; these tests
# must not depend on whichever conftest or ini file happens to add it.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from include import demo_api  # noqa: E402
from include.demo_api import (  # noqa: E402
    DATA_ENDPOINTS,
    MAX_SLOW_SECONDS,
    TokenBucket,
    make_server,
    retry_after_seconds,
)


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(bucket: TokenBucket, now: float) -> int:
    """Take tokens at one instant until refused; return how many were granted."""
    granted = 0
    while bucket.try_acquire(now).allowed:
        granted += 1
    return granted


# --------------------------------------------------------------------------
# TokenBucket, pure.
# --------------------------------------------------------------------------


def test_a_full_bucket_grants_exactly_its_burst_then_refuses():
    bucket = TokenBucket(rate_per_s=0.5, burst=3, clock=FakeClock())

    decisions = [bucket.try_acquire(now=100.0) for _ in range(4)]

    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in decisions)


def test_a_refusal_says_how_long_until_the_next_token():
    bucket = TokenBucket(rate_per_s=0.5, burst=3)
    drain(bucket, now=100.0)

    refused_at_once = bucket.try_acquire(now=100.0)
    refused_later = bucket.try_acquire(now=100.5)

    assert refused_at_once.seconds_until_next_token == pytest.approx(2.0)
    assert refused_at_once.retry_after_s == 2
    assert refused_later.seconds_until_next_token == pytest.approx(1.5)
    assert refused_later.retry_after_s == 2  # rounded up, never down


def test_the_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate_per_s=0.5, burst=3)
    drain(bucket, now=100.0)

    assert not bucket.try_acquire(now=101.9).allowed
    assert bucket.try_acquire(now=102.0).allowed
    assert not bucket.try_acquire(now=102.0).allowed
    assert drain(bucket, now=106.0) == 2


def test_a_long_idle_period_refills_no_more_than_the_burst():
    bucket = TokenBucket(rate_per_s=10, burst=3)
    drain(bucket, now=0.0)

    assert drain(bucket, now=10_000.0) == 3


def test_refused_requests_do_not_push_the_next_token_further_away():
    bucket = TokenBucket(rate_per_s=1, burst=1)
    bucket.try_acquire(now=50.0)

    for tick in range(9):
        assert not bucket.try_acquire(now=50.0 + tick / 10).allowed

    assert bucket.try_acquire(now=51.0).allowed


def test_a_clock_stepping_backwards_does_not_drain_the_bucket():
    bucket = TokenBucket(rate_per_s=1, burst=2)
    bucket.try_acquire(now=100.0)

    assert bucket.try_acquire(now=90.0).allowed


def test_without_an_explicit_instant_the_injected_clock_is_read():
    clock = FakeClock(start=500.0)
    bucket = TokenBucket(rate_per_s=1, burst=1, clock=clock)
    assert bucket.try_acquire().allowed
    assert not bucket.try_acquire().allowed

    clock.advance(1.0)

    assert bucket.try_acquire().allowed


def test_a_granted_decision_says_when_the_next_whole_token_arrives():
    bucket = TokenBucket(rate_per_s=0.25, burst=2)

    first = bucket.try_acquire(now=0.0)
    second = bucket.try_acquire(now=1.0)  # 1.0 + 0.25 - 1 = 0.25 tokens left

    assert first.seconds_until_next_token == pytest.approx(4.0)
    assert first.reset_s == 4
    assert second.remaining == 0
    assert second.seconds_until_next_token == pytest.approx(3.0)


def test_a_full_bucket_has_nothing_to_wait_for():
    bucket = TokenBucket(rate_per_s=1, burst=2)
    bucket.try_acquire(now=0.0)

    after_refill = bucket.try_acquire(now=100.0)  # back to 2, took 1: not full
    assert after_refill.remaining == 1
    assert after_refill.reset_s == 1


@pytest.mark.parametrize(("rate", "burst"), [(0, 3), (-1, 3), (1, 0)])
def test_a_bucket_that_could_never_grant_is_rejected(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=rate, burst=burst)


@pytest.mark.parametrize(
    ("wait_s", "header"),
    [(0.0, 1), (0.001, 1), (1.0, 1), (1.0001, 2), (2.0, 2), (29.5, 30)],
)
def test_retry_after_rounds_up_and_is_at_least_one_second(wait_s, header):
    assert retry_after_seconds(wait_s) == header


def test_waiting_exactly_retry_after_yields_a_token_even_where_floats_round_down():
    # Here (start + 2) - start == 1.99999999999989, so a naive bucket would hold
    # 0.99999999999994 tokens at the promised instant and refuse.
    start = 1023.68
    bucket = TokenBucket(rate_per_s=0.5, burst=1)
    bucket.try_acquire(now=start)
    refused = bucket.try_acquire(now=start)
    assert refused.retry_after_s == 2
    assert (start + 2) - start < 2

    assert bucket.try_acquire(now=start + refused.retry_after_s).allowed


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.01, max_value=100.0),
    burst=st.integers(min_value=1, max_value=6),
    start=st.floats(min_value=0.0, max_value=1e7),
    steps=st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=12),
)
def test_waiting_exactly_retry_after_always_yields_a_token(rate, burst, start, steps):
    bucket = TokenBucket(rate_per_s=rate, burst=burst)
    now = start
    for step in steps:  # an arbitrary history of traffic
        now += step
        bucket.try_acquire(now)
    drain(bucket, now)

    refused = bucket.try_acquire(now)

    assert not refused.allowed
    assert bucket.try_acquire(now + refused.retry_after_s).allowed


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.01, max_value=100.0),
    burst=st.integers(min_value=1, max_value=6),
    start=st.floats(min_value=0.0, max_value=1e7),
)
def test_retry_after_is_never_a_whole_second_too_pessimistic(rate, burst, start):
    bucket = TokenBucket(rate_per_s=rate, burst=burst)
    drain(bucket, start)

    refused = bucket.try_acquire(start)

    assert refused.retry_after_s < refused.seconds_until_next_token + 1


# --------------------------------------------------------------------------
# The real server, in a thread on a free port.
# --------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: bytes | None = None) -> Response:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


def get(port: int, path: str) -> Response:
    return call(port, "GET", path)


@pytest.fixture
def serve() -> Iterator:
    """Start demo servers in threads; all are shut down after the test."""
    servers = []

    def start(rate: float = 1000.0, burst: int = 1000, **kwargs: Any) -> int:
        server = make_server("127.0.0.1", 0, rate, burst, **kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def port(serve) -> int:
    """A demo server generous enough never to rate-limit a functional test."""
    return serve()


@pytest.mark.parametrize("name", sorted(DATA_ENDPOINTS))
def test_each_data_endpoint_names_itself_and_stamps_the_server_time(port, name):
    response = get(port, f"/api/{name}")

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    document = response.json()
    assert document["endpoint"] == name
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", document["server_time"])
    assert document["data"]


def test_data_endpoints_are_deterministic_apart_from_the_timestamp(serve):
    port = serve(wall_clock=lambda: 1_700_000_000.0)

    first, second = get(port, "/api/users").json(), get(port, "/api/users").json()

    assert first == second
    assert first["server_time"] == "2023-11-14T22:13:20+00:00"


def test_an_item_is_served_by_its_integer_id(port):
    document = get(port, "/api/items/42").json()

    assert document["endpoint"] == "items"
    assert document["item"]["id"] == 42
    assert get(port, "/api/items/42").json()["item"] == document["item"]


def test_an_item_id_that_is_not_an_integer_is_not_found(port):
    assert get(port, "/api/items/forty-two").status == 404


def test_an_unknown_path_is_a_json_404_naming_the_path(port):
    response = get(port, "/no/such/thing")

    assert response.status == 404
    assert response.json() == {"error": "not found", "path": "/no/such/thing"}


def test_posting_to_a_read_only_endpoint_is_405_with_an_allow_header(port):
    response = call(port, "POST", "/api/users", body=b"{}")

    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.json()["error"] == "method not allowed"


def test_getting_the_echo_endpoint_is_405(port):
    assert get(port, "/api/echo").status == 405


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_echo_sends_the_json_body_back(port, method):
    document = {"name": "widget", "tags": ["a", "b"], "count": 3}

    response = call(port, method, "/api/echo", body=json.dumps(document).encode())

    assert response.status == 200
    assert response.json() == document


def test_echo_rejects_invalid_json_with_a_json_400(port):
    response = call(port, "POST", "/api/echo", body=b"{not json")

    assert response.status == 400
    assert response.json()["error"] == "invalid JSON"


def test_slow_sleeps_for_the_requested_seconds_capped_at_thirty(serve):
    slept: list[float] = []
    port = serve(sleep=slept.append)

    assert get(port, "/api/slow?seconds=1.5").json()["slept_s"] == 1.5
    assert get(port, "/api/slow?seconds=3600").json()["slept_s"] == MAX_SLOW_SECONDS
    assert slept == [1.5, MAX_SLOW_SECONDS]


def test_slow_really_waits_before_answering(port):
    response = get(port, "/api/slow?seconds=0.1")

    assert response.status == 200
    assert response.json()["slept_s"] == 0.1


def test_slow_with_a_non_numeric_duration_is_400(port):
    assert get(port, "/api/slow?seconds=soon").status == 400


def test_head_returns_headers_without_a_body(port):
    response = call(port, "HEAD", "/api/users")

    assert response.status == 200
    assert response.body == b""
    assert int(response.headers["Content-Length"]) > 0


def test_successful_api_calls_carry_rate_limit_headers(serve):
    port = serve(rate=0.5, burst=3, clock=FakeClock())

    response = get(port, "/api/orders")

    assert response.headers["RateLimit-Limit"] == "3"
    assert response.headers["RateLimit-Remaining"] == "2"
    assert response.headers["RateLimit-Reset"] == "2"


def test_after_the_burst_the_api_answers_429_with_every_rate_limit_header(serve):
    port = serve(rate=0.5, burst=3, clock=FakeClock())
    for name in ["users", "orders", "products"]:
        assert get(port, f"/api/{name}").status == 200

    response = get(port, "/api/weather")

    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    assert response.headers["RateLimit-Limit"] == "3"
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == "2"
    assert response.json() == {"error": "rate limited", "retry_after": 2}


def test_one_bucket_is_shared_by_every_api_endpoint(serve):
    port = serve(rate=0.5, burst=2, clock=FakeClock())

    statuses = [get(port, path).status for path in ["/api/users", "/api/items/1", "/api/inventory"]]

    assert statuses == [200, 200, 429]


def test_a_client_that_waits_retry_after_seconds_is_served(serve):
    clock = FakeClock(start=1023.68)  # a start where float rounding bites (see above)
    port = serve(rate=0.5, burst=1, clock=clock)
    get(port, "/api/users")
    refused = get(port, "/api/users")

    clock.advance(int(refused.headers["Retry-After"]))

    assert get(port, "/api/users").status == 200


def test_health_and_stats_are_never_rate_limited(serve):
    port = serve(rate=0.01, burst=1, clock=FakeClock())
    get(port, "/api/users")
    assert get(port, "/api/users").status == 429

    for _ in range(5):
        health = get(port, "/health")
        assert health.status == 200
        assert health.json() == {"status": "ok"}
        assert "RateLimit-Limit" not in health.headers
        assert get(port, "/stats").status == 200


def test_stats_count_requests_successes_and_refusals(serve):
    port = serve(rate=0.01, burst=2, clock=FakeClock())
    for path in ["/health", "/api/users", "/api/users", "/api/users", "/api/users", "/nowhere"]:
        get(port, path)

    stats = get(port, "/stats").json()

    assert stats["requests_total"] == 6
    assert stats["responses_2xx"] == 3
    assert stats["responses_429"] == 2
    assert stats["responses_by_status"] == {"200": 3, "404": 1, "429": 2}


def test_requests_are_logged_one_line_each(port, caplog):
    with caplog.at_level("INFO", logger="demo_api"):
        get(port, "/health")
        get(port, "/api/users")

    lines = [record.getMessage() for record in caplog.records if record.name == "demo_api"]
    assert len(lines) == 2
    assert '"GET /health HTTP/1.1" 200' in lines[0]
    assert '"GET /api/users HTTP/1.1" 200' in lines[1]


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_the_script_serves_until_signalled_then_exits_cleanly(stop_signal):
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "include" / "demo_api.py"), "--port", "0", "--burst", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first_line = process.stderr.readline()
        listening = re.search(r"listening on http://127\.0\.0\.1:(\d+)", first_line)
        assert listening, first_line
        assert get(int(listening.group(1)), "/health").json() == {"status": "ok"}

        process.send_signal(stop_signal)
        _, rest_of_log = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    assert '"GET /health HTTP/1.1" 200' in rest_of_log
    assert "stopped" in rest_of_log


def test_a_stop_signal_landing_while_a_request_is_accepted_still_stops_the_server(monkeypatch):
    from tests.support.servers import assert_a_stop_raised_while_accepting_leaves_the_loop

    assert_a_stop_raised_while_accepting_leaves_the_loop(
        monkeypatch, make_server(port=0), demo_api._StopRequested("SIGTERM")
    )
