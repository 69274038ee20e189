"""Faults of the API itself, on the embedded stack: silence (case 4), a huge or never-ending body
(case 5) and odd responses (case 8). Each run in a real task process, checked through the
REST API, the task log files and what the server saw.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.scripted_api import ScriptedResponse

from . import dag_sources
from .conftest import DAG_IDS
from .helpers import MemorySampler, assert_clear_failure, failure_summary, parse_time, pid_with_local_port

pytestmark = pytest.mark.reliability

# -- case 4: the API accepts the connection and never answers ----------------------------


def test_an_api_that_never_answers_hits_the_request_timeout_and_spends_a_try(stack, api):
    dag_id = DAG_IDS["c4"]
    api.route("/c4/hang", ScriptedResponse.hang(60), ScriptedResponse(body={"answered": True}))

    run_id = stack.trigger(dag_id)
    run = stack.wait_for_run(dag_id, run_id, timeout=150)

    tries = stack.tries(dag_id, run_id, "request")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "request", 1))
    assert [t["try_number"] for t in tries] == [1, 2], "the timeout must spend exactly one try"
    assert tries[0]["state"] in ("up_for_retry", "failed")
    first, second = api.requests_for("/c4/hang")
    # request_timeout=2 (read) fired, then retry_delay=1s: the retry came after both.
    assert second.received_monotonic - first.received_monotonic >= 3.0
    try_1 = stack.task_log(dag_id, run_id, "request", 1)
    assert_clear_failure(try_1, "TransientRequestError", f"GET {api.base_url}/c4/hang", "timed out")
    ended = parse_time(tries[0]["end_date"]) - parse_time(tries[0]["start_date"])
    assert ended.total_seconds() < 30, f"try 1 took {ended}: the 2 s read timeout did not fire"


# -- case 5: a huge body, and a body that never ends --------------------------------------


def test_a_huge_body_stops_at_max_response_bytes_with_bounded_memory_and_no_retry(stack, servers):
    stream_api = servers.stream_api
    dag_id = DAG_IDS["c5_huge"]

    run_id = stack.trigger(dag_id)
    stream = stream_api.wait_for_stream("/huge", timeout=90)[-1]
    # The server holds the body until the client process is found (by its end of the connection).
    pid = stack.wait_for("the task process", lambda: pid_with_local_port(stack.pids(), stream.client_port), 15, 0.1)
    sampler = MemorySampler(pid).start()
    stream.go.set()
    sampler.wait(timeout=60)
    run = stack.wait_for_run(dag_id, run_id, timeout=60)

    ti = stack.task_instance(dag_id, run_id, "request")
    log = stack.task_log(dag_id, run_id, "request", 1)
    message = assert_clear_failure(log, "ResponseTooLargeError", "max_response_bytes=1048576", "stopped reading")
    assert run["state"] == "failed"
    assert ti["try_number"] == 1, "a body over the limit fails at once: retries=2 must not be used"
    deadline = time.monotonic() + 10
    while stream.ended is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stream.client_gone, "the client should hang up once it has read max_response_bytes"
    sent_mib = stream.bytes_sent / 2**20
    growth_mib = sampler.growth_kb / 1024
    print(
        f"\n[case 5] {message}\n[case 5] server offered {dag_sources.HUGE_BYTES / 2**20:.0f} MiB, sent {sent_mib:.1f} MiB "
        f"before the client hung up; task process {pid}: RSS {sampler.first_rss_kb / 1024:.0f} MiB at the first "
        f"byte, peak (VmHWM) {sampler.last_hwm_kb / 1024:.0f} MiB, growth {growth_mib:.1f} MiB "
        f"({sampler.samples} samples)"
    )
    assert sampler.samples > 0
    assert sent_mib < 100, "the client kept reading far past the limit"
    assert growth_mib < 32, f"peak RSS rose by {growth_mib:.0f} MiB reading a body capped at 1 MiB"


def test_a_slow_drip_body_is_stopped_by_execution_timeout(stack, servers):
    """requests' read timeout is per socket read: a byte every 0.5 s never trips a 2 s read
    timeout. The task's ``execution_timeout`` (here 10 s, below the default request_deadline)
    ends such a request."""
    stream_api = servers.stream_api
    dag_id = DAG_IDS["c5_drip"]

    run_id = stack.trigger(dag_id)
    stream = stream_api.wait_for_stream("/drip", timeout=90)[-1]
    time.sleep(6)  # three read timeouts
    state_after_6s = stack.task_instance(dag_id, run_id, "request")["state"]
    run = stack.wait_for_run(dag_id, run_id, timeout=90)
    stream.stop.set()

    log = stack.task_log(dag_id, run_id, "request", 1)
    ti = stack.task_instance(dag_id, run_id, "request")
    assert state_after_6s == "running", "the drip should still be read after 3 read timeouts"
    assert run["state"] == "failed"
    assert "AirflowTaskTimeout" in log or "Timeout" in failure_summary(log), failure_summary(log)
    duration = parse_time(ti["end_date"]) - parse_time(ti["start_date"])
    assert duration.total_seconds() >= dag_sources.DRIP_EXECUTION_TIMEOUT_S
    assert stream.bytes_sent >= 10, "the server kept dripping while the task waited"


@pytest.fixture
def drip_connection(monkeypatch, servers):
    monkeypatch.setenv("AIRFLOW_CONN_REL_DRIP", servers.stream_api.base_url)
    return servers.stream_api


def _send_in_thread(operator, endpoint: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def send() -> None:
        started = time.monotonic()
        try:
            outcome["response"] = operator.send_request(endpoint, operator.hook.url_from_endpoint(endpoint))
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def test_the_read_timeout_alone_never_ends_a_slow_drip(drip_connection):
    """``request_timeout=(1, 1)`` and a drip of one byte every 0.3 s: still reading after 5 s
    (why a total deadline is needed; the default request_deadline is minutes)."""
    from network_requests import NetworkRequestOperator

    operator = NetworkRequestOperator(task_id="drip", http_conn_id="rel_drip", endpoint="/drip", request_timeout=(1, 1))
    before = len(drip_connection.streams_to("/drip"))
    thread, outcome = _send_in_thread(operator, "/drip?every=0.3")
    stream = drip_connection.wait_for_stream("/drip", before + 1, timeout=10)[-1]
    thread.join(5)
    still_reading = thread.is_alive()
    stream.stop.set()  # the server ends the body: the request completes
    thread.join(10)
    assert still_reading, f"the request ended within 5 s: {outcome}"
    assert "response" in outcome and outcome["elapsed"] >= 5


def test_request_deadline_cuts_a_slow_drip(drip_connection):
    """``request_deadline`` bounds the whole request: its watchdog shuts the socket down, also
    for a ``Connection: close`` response (whose socket http.client has detached from urllib3's
    connection), and the try fails as a timeout."""
    from network_requests import NetworkRequestOperator
    from network_requests.exceptions import TransientRequestError

    operator = NetworkRequestOperator(
        task_id="drip", http_conn_id="rel_drip", endpoint="/drip", request_timeout=(2, 2), request_deadline=3
    )
    thread, outcome = _send_in_thread(operator, "/drip?every=0.3")
    thread.join(10)
    for stream in drip_connection.streams_to("/drip"):
        stream.stop.set()
    still_reading = thread.is_alive()
    thread.join(10)
    assert not still_reading, f"request_deadline=3 did not end the request within 10 s: {outcome}"
    assert isinstance(outcome.get("error"), TransientRequestError), outcome
    assert "request_deadline" in str(outcome["error"]) and "/drip" in str(outcome["error"])
    assert outcome["elapsed"] < 3 + 2 + 1, "the deadline may overrun by at most one read timeout"


# -- case 8: invalid JSON, wrong content type, empty body, non-UTF-8 ----------------------

LATIN1_TEXT = "café naïve"


def test_odd_responses_give_a_clear_result_or_a_clear_error(stack, api):
    dag_id = DAG_IDS["c8"]
    json_type = {"Content-Type": "application/json"}
    api.route_default("/c8/invalid-json", ScriptedResponse(headers=json_type, body=b'{"items": [1, 2,'))
    api.route_default("/c8/html", ScriptedResponse(headers={"Content-Type": "text/html; charset=utf-8"}, body=b"<html><body>maintenance page</body></html>"))
    api.route_default("/c8/empty", ScriptedResponse(headers={"Content-Type": "text/plain"}, body=b""))
    api.route_default("/c8/empty-json", ScriptedResponse(headers=json_type, body=b""))
    api.route_default("/c8/latin1", ScriptedResponse(headers={"Content-Type": "text/plain; charset=utf-8"}, body=LATIN1_TEXT.encode("latin-1")))
    api.route_default("/c8/latin1-json", ScriptedResponse(headers=json_type, body='{"name": "café"}'.encode("latin-1")))

    run_id = stack.trigger(dag_id)
    stack.wait_for_run(dag_id, run_id, timeout=180)
    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    xcoms = {entry["task_id"]: entry["value"] for entry in stack.xcom_entries(dag_id, run_id) if entry["key"] == "return_value"}
    logs = {task_id: stack.task_log(dag_id, run_id, task_id, 1) for task_id in tis}
    report = "\n".join(f"{t}: {ti['state']} try {ti['try_number']} xcom={xcoms.get(t)!r}" for t, ti in tis.items())
    print(f"\n[case 8]\n{report}")

    def failed_at_once(task_id: str, *needles: str) -> str:
        assert tis[task_id]["state"] == "failed", report
        assert tis[task_id]["try_number"] == 1, f"{task_id}: a response that can never become valid must not be retried"
        return assert_clear_failure(logs[task_id], "PermanentRequestError", *needles)

    base = api.base_url
    message = failed_at_once("invalid_json", f"GET {base}/c8/invalid-json", "not valid JSON", '{"items": [1, 2,')
    print(f"[case 8] invalid_json: {message}")
    message = failed_at_once("non_utf8_json", f"GET {base}/c8/latin1-json", "not valid JSON")
    print(f"[case 8] non_utf8_json: {message}")
    # Not JSON, and not declared as JSON: the body is the result, as text.
    assert tis["wrong_content_type"]["state"] == "success", report
    assert xcoms["wrong_content_type"] == "<html><body>maintenance page</body></html>"
    assert tis["empty_body"]["state"] == "success", report
    assert xcoms.get("empty_body") in ("", None)
    assert tis["empty_json_body"]["state"] == "success", report
    assert xcoms.get("empty_json_body") is None, "an empty JSON body is no value, not an error"
    assert tis["non_utf8_text"]["state"] == "success", report
    assert xcoms["non_utf8_text"] == LATIN1_TEXT.encode("latin-1").decode("utf-8", errors="replace")
