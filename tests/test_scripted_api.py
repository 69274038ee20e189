"""The scripted HTTP server that integration tests point HTTP clients at."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The project root is not necessarily on sys.path under plain `pytest`; these tests
# must not depend on whichever conftest or ini file happens to add it.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from tests.support.ports import free_port  # noqa: E402
from tests.support.scripted_api import (  # noqa: E402
    ScriptedApi,
    ScriptedResponse,
    gaps_between,
    scripted_api_fixture,
)


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def call(
    api: ScriptedApi,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


@pytest.fixture
def api():
    yield from scripted_api_fixture()


def test_scripted_responses_are_played_in_order_then_the_default(api):
    api.script(
        ScriptedResponse(status=201, body={"created": True}),
        ScriptedResponse(status=503, body="try later"),
        ScriptedResponse(status=200, body=b"\x00raw"),
    )

    answers = [call(api, path=f"/anything/{n}") for n in range(4)]

    assert [a.status for a in answers] == [201, 503, 200, 200]
    assert json.loads(answers[0].body) == {"created": True}
    assert answers[1].body == b"try later"
    assert answers[2].body == b"\x00raw"
    assert json.loads(answers[3].body) == {"ok": True}
    assert api.remaining_scripted == 0


def test_the_script_ignores_method_and_path(api):
    api.script(ScriptedResponse(status=418), ScriptedResponse(status=202))

    assert call(api, "DELETE", "/a").status == 418
    assert call(api, "PURGE", "/b/c").status == 202


def test_a_dict_body_is_sent_as_json_and_a_str_body_as_text(api):
    api.script(ScriptedResponse(body={"a": 1}), ScriptedResponse(body="hello"))

    assert call(api).headers["Content-Type"] == "application/json"
    assert call(api).headers["Content-Type"] == "text/plain; charset=utf-8"


def test_explicit_headers_are_sent_and_win_over_defaults(api):
    api.script(
        ScriptedResponse(
            body={"a": 1},
            headers={"Content-Type": "application/vnd.api+json", "X-Request-Id": "abc"},
        )
    )

    answer = call(api)

    assert answer.headers["Content-Type"] == "application/vnd.api+json"
    assert answer.headers["X-Request-Id"] == "abc"


def test_too_many_requests_is_a_429_with_retry_after(api):
    api.script(ScriptedResponse.too_many_requests(retry_after=3))

    answer = call(api)

    assert answer.status == 429
    assert answer.headers["Retry-After"] == "3"
    assert json.loads(answer.body) == {"error": "rate limited"}


def test_a_204_is_sent_without_a_body(api):
    api.script(ScriptedResponse(status=204, body="ignored"), ScriptedResponse(status=200, body="next"))

    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    try:
        for expected_status, expected_body in [(204, b""), (200, b"next")]:  # one kept-alive connection
            connection.request("GET", "/")
            response = connection.getresponse()
            assert (response.status, response.read()) == (expected_status, expected_body)
    finally:
        connection.close()


def test_the_default_response_can_be_changed(api):
    api.default_response = ScriptedResponse(status=404, body={"error": "not found"})

    assert call(api).status == 404
    assert call(api).status == 404


def test_every_request_is_recorded_with_method_path_query_headers_and_body(api):
    before = time.time()

    call(api, "POST", "/v1/things?page=2&tag=a&tag=b", body=b'{"x": 1}', headers={"X-Token": "secret"})

    (request,) = api.requests
    assert request.method == "POST"
    assert request.path == "/v1/things"
    assert request.query == "page=2&tag=a&tag=b"
    assert request.query_params == {"page": ["2"], "tag": ["a", "b"]}
    assert request.headers["X-Token"] == "secret"
    assert request.header("x-token") == "secret"
    assert request.body == b'{"x": 1}'
    assert request.json() == {"x": 1}
    assert before <= request.received_at <= time.time()
    assert request.response == api.default_response


def test_each_recorded_request_knows_the_response_it_got(api):
    refusal = ScriptedResponse.too_many_requests()
    api.script(refusal)

    call(api)
    call(api)

    assert [r.response.status for r in api.requests] == [429, 200]
    assert api.requests[0].response is refusal


def test_a_chunked_request_body_is_recorded_decoded(api):
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    try:
        connection.request("POST", "/upload", body=iter([b"hello ", b"world"]), encode_chunked=True)
        assert connection.getresponse().status == 200
    finally:
        connection.close()

    assert api.requests[0].body == b"hello world"


def test_gaps_are_the_seconds_between_consecutive_requests(api):
    call(api)
    time.sleep(0.2)
    call(api)
    call(api)

    first_gap, second_gap = api.gaps()

    assert first_gap >= 0.2
    assert 0 <= second_gap < 0.2
    assert api.request_count == 3


def test_gaps_come_from_the_injected_monotonic_clock():
    instants = iter([10.0, 12.5, 13.0])
    with ScriptedApi(monotonic_clock=lambda: next(instants)) as api:
        for _ in range(3):
            call(api)

        assert api.gaps() == [2.5, 0.5]


def test_gaps_between_sorts_instants_first():
    assert gaps_between([3.0, 1.0, 2.5]) == [1.5, 0.5]
    assert gaps_between([7.0]) == []


def test_a_delayed_response_arrives_no_sooner_than_its_delay(api):
    api.script(ScriptedResponse(body="late", delay_s=0.2))
    started = time.monotonic()

    answer = call(api)

    assert answer.body == b"late"
    assert time.monotonic() - started >= 0.2


def test_a_hang_makes_the_client_time_out_and_is_still_recorded(api):
    api.script(ScriptedResponse.hang(10), ScriptedResponse(body="after the hang"))

    with pytest.raises(TimeoutError):
        call(api, path="/stuck", timeout=0.3)

    assert api.requests[0].path == "/stuck"
    assert call(api).body == b"after the hang"


def test_stop_cuts_a_hang_short():
    api = ScriptedApi().start()
    api.script(ScriptedResponse.hang(30))
    client_error: list[BaseException] = []

    def hung_client() -> None:
        try:
            call(api, timeout=10)
        except Exception as exc:  # noqa: BLE001 - we only care that it ends
            client_error.append(exc)

    client = threading.Thread(target=hung_client)
    client.start()
    api.wait_for_requests(1)
    started = time.monotonic()

    api.stop()
    client.join(timeout=5)

    assert time.monotonic() - started < 2
    assert not client.is_alive()
    assert isinstance(client_error[0], ConnectionError | http.client.HTTPException)


def test_close_drops_the_connection_without_answering(api):
    api.script(ScriptedResponse.close(), ScriptedResponse(body="still serving"))

    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        call(api)

    assert api.request_count == 1
    assert call(api).body == b"still serving"


def test_concurrent_requests_each_get_exactly_one_scripted_response(api):
    api.script(*[ScriptedResponse(status=200, body=str(n)) for n in range(20)])
    bodies: list[bytes] = []
    lock = threading.Lock()

    def client() -> None:
        body = call(api).body
        with lock:
            bodies.append(body)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    assert sorted(bodies, key=int) == [str(n).encode() for n in range(20)]
    assert api.request_count == 20
    assert [r.response.body for r in api.requests] == [str(n) for n in range(20)]


def test_wait_for_requests_gives_up_after_its_timeout(api):
    with pytest.raises(TimeoutError):
        api.wait_for_requests(1, timeout=0.1)


def test_clear_forgets_requests_and_queued_responses(api):
    api.script(ScriptedResponse(status=500), ScriptedResponse(status=500))
    call(api)

    api.clear()

    assert api.request_count == 0
    assert call(api).status == 200


def test_the_context_manager_serves_inside_and_refuses_after():
    with ScriptedApi() as api:
        port = api.port
        assert api.base_url == f"http://127.0.0.1:{port}"
        assert api.url("/x") == f"http://127.0.0.1:{port}/x"
        assert call(api).status == 200

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_the_fixture_generator_yields_a_started_api_and_stops_it_afterwards():
    fixture = scripted_api_fixture()
    api = next(fixture)
    port = api.port
    assert call(api).status == 200

    fixture.close()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_an_api_that_is_not_started_has_no_address():
    with pytest.raises(RuntimeError):
        ScriptedApi().base_url


def test_free_port_returns_a_port_that_can_be_bound():
    port = free_port()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_an_unknown_action_is_rejected():
    with pytest.raises(ValueError):
        ScriptedResponse(action="explode")
