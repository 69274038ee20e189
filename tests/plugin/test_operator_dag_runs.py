"""NetworkRequestOperator through real Airflow: dag.test() on SQLite against a scripted server on 127.0.0.1.

Each test checks what a user sees (task state, try_number) and what the server saw
(how many requests, and never one before the time it allowed).
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from tests.conftest import TEST_DAGS_DIR
from tests.support.dag_runner import (
    operator_dag_source,
    rescheduling,
    run_dag,
    run_operator_task,
    set_connection,
    write_dag_file,
)
from tests.support.scripted_api import ScriptedApi, ScriptedResponse, free_port

pytestmark = pytest.mark.usefixtures("airflow_db")

# Small delays keep the suite quick; dag.test() polls about once a second, so a
# reschedule runs up to ~1 s after its time. Never before it: that is what we assert.
FAST_RETRIES = "{'retries': 2, 'retry_delay': timedelta(seconds=1)}"


def run_operator(request, api_url: str, operator_kwargs: str, default_args: str = FAST_RETRIES):
    """Run one NetworkRequestOperator task. Short waits are rescheduled here (threshold 0),
    so the seconds-long waits of these tests exercise the reschedule path; the default
    in-process path has its own tests."""
    return run_operator_task(request, api_url, rescheduling(operator_kwargs), default_args)


def test_429_with_retry_after_seconds_reschedules_without_spending_a_try(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=2), ScriptedResponse(body={"users": [1, 2]}))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users'")

    task = result.task("request")
    assert result.state == "success"
    assert task.state == "success"
    assert task.try_number == 1, "a rate-limit wait must not spend a retry"
    assert task.reschedules == 1
    assert task.xcom == {"users": [1, 2]}
    assert scripted_api.request_count == 2
    assert scripted_api.gaps()[0] >= 2.0, "second request sent before Retry-After allowed it"


def test_429_with_retry_after_http_date_waits_until_that_date(request, scripted_api):
    allowed_at = int(time.time()) + 3
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=formatdate(allowed_at, usegmt=True)),
        ScriptedResponse(body={"ok": True}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/orders'")

    assert result.task("request").state == "success"
    assert result.task("request").try_number == 1
    assert scripted_api.requests[1].received_at >= allowed_at


def test_429_with_ratelimit_reset_and_no_remaining_quota_waits_the_reset(request, scripted_api):
    scripted_api.script(
        ScriptedResponse(status=429, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "2"}),
        ScriptedResponse(body={"ok": True}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/products'")

    assert result.task("request").state == "success"
    assert result.task("request").try_number == 1
    assert scripted_api.gaps()[0] >= 2.0


def test_429_with_github_style_epoch_reset_waits_until_the_epoch(request, scripted_api):
    reset_epoch = int(time.time()) + 3
    scripted_api.script(
        ScriptedResponse(
            status=429, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_epoch)}
        ),
        ScriptedResponse(body={"ok": True}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/inventory'")

    assert result.task("request").state == "success"
    assert scripted_api.requests[1].received_at >= reset_epoch


def test_429_without_any_header_backs_off_by_retry_delay(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=None), ScriptedResponse(body={"ok": True}))

    result = run_operator(
        request, scripted_api.base_url, "endpoint='/api/weather'", "{'retries': 0, 'retry_delay': timedelta(seconds=2)}"
    )

    assert result.task("request").state == "success"
    assert result.task("request").try_number == 1
    assert scripted_api.gaps()[0] >= 2.0


def test_malformed_retry_after_falls_back_to_backoff_instead_of_crashing(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after="soon-ish"), ScriptedResponse(body={"ok": 1}))

    result = run_operator(
        request, scripted_api.base_url, "endpoint='/api/users'", "{'retries': 0, 'retry_delay': timedelta(seconds=2)}"
    )

    assert result.task("request").state == "success"
    assert scripted_api.gaps()[0] >= 2.0


def test_503_with_retry_after_is_a_rate_limit_not_a_retry(request, scripted_api):
    scripted_api.script(
        ScriptedResponse(status=503, headers={"Retry-After": "1"}, body="maintenance"),
        ScriptedResponse(body={"ok": True}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users'")

    assert result.task("request").state == "success"
    assert result.task("request").try_number == 1
    assert scripted_api.gaps()[0] >= 1.0


def test_500_then_success_spends_one_retry(request, scripted_api):
    scripted_api.script(ScriptedResponse(status=500, body="boom"), ScriptedResponse(body={"ok": True}))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users'")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 2, "a server error goes through Airflow's normal retries"
    assert len(task.earlier_tries) == 1, "one earlier, failed try is kept in the task history"
    assert scripted_api.request_count == 2


def test_404_fails_at_once_without_retrying(request, scripted_api):
    scripted_api.script(ScriptedResponse(status=404, body={"error": "no such user"}))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users/999'")

    task = result.task("request")
    assert result.state == "failed"
    assert task.state == "failed"
    assert task.try_number == 1, "a permanent error must not use the retries"
    assert scripted_api.request_count == 1


def test_connection_refused_is_retried_then_fails(request):
    closed_port = free_port()  # nothing listens there

    result = run_operator(request, f"http://127.0.0.1:{closed_port}", "endpoint='/api/users'",
                          "{'retries': 1, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("request")
    assert task.state == "failed"
    assert task.try_number == 2, "connection errors spend retries like any transient error"


def test_wait_longer_than_max_rate_limit_wait_fails_at_once(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=7200))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users'")

    task = result.task("request")
    assert task.state == "failed"
    assert task.try_number == 1, "retrying early would send a request before the server allowed"
    assert task.reschedules == 0
    assert scripted_api.request_count == 1


def test_total_rate_limit_wait_beyond_rate_limit_timeout_fails(request, scripted_api):
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=2),
        ScriptedResponse.too_many_requests(retry_after=2),
        ScriptedResponse(body={"never": "reached"}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users', rate_limit_timeout=3")

    task = result.task("request")
    assert task.state == "failed"
    assert task.reschedules == 1
    assert scripted_api.request_count == 2


def test_initial_delay_sends_nothing_before_the_delay(request, scripted_api):
    started = time.time()

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users', initial_delay=2")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 1
    assert scripted_api.request_count == 1
    assert scripted_api.requests[0].received_at - started >= 2.0


def test_output_path_writes_the_body_and_returns_where(request, scripted_api, tmp_path: Path):
    body = {"items": list(range(100))}
    scripted_api.script(ScriptedResponse(body=body))
    target = tmp_path / "out" / "items.json"

    result = run_operator(request, scripted_api.base_url, f"endpoint='/api/items', output_path={str(target)!r}")

    task = result.task("request")
    assert task.state == "success"
    assert json.loads(target.read_text()) == body
    assert task.xcom["path"] == str(target)
    assert task.xcom["status_code"] == 200
    assert task.xcom["bytes"] == target.stat().st_size
    assert list(target.parent.iterdir()) == [target], "no temporary file left behind"


def test_deferrable_wait_resumes_after_retry_after_without_spending_a_try(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=2), ScriptedResponse(body={"ok": True}))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users', deferrable=True")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 1
    assert task.reschedules == 0, "deferred, not rescheduled"
    assert scripted_api.request_count == 2
    assert scripted_api.gaps()[0] >= 2.0


def test_short_wait_happens_in_process_under_the_threshold(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users', in_process_wait_threshold=2")

    task = result.task("request")
    assert task.state == "success"
    assert task.reschedules == 0, "a 1 s wait under a 2 s threshold is slept in the running task"
    assert scripted_api.gaps()[0] >= 1.0


def test_shared_gate_holds_other_tasks_back_without_sending(request, scripted_api):
    """The first task to send learns the API is blocked for 3 s; the other two wait without sending."""
    scripted_api.default_response = ScriptedResponse(body={"ok": True})
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=3))
    dag_id = request.node.name
    set_connection(scripted_api.base_url)
    source = f'''
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from network_requests import NetworkRequestOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         default_args={{"retries": 0}}) as dag:
    NetworkRequestOperator(task_id="a", endpoint="/a", deferrable=False, in_process_wait_threshold=0)
    NetworkRequestOperator(task_id="b", endpoint="/b", deferrable=False, in_process_wait_threshold=0)
    NetworkRequestOperator(task_id="c", endpoint="/c", deferrable=False, in_process_wait_threshold=0)
'''
    path = write_dag_file(TEST_DAGS_DIR, dag_id, source)
    started = time.time()

    result = run_dag(path, dag_id)

    assert {key[0]: task.state for key, task in result.tasks.items()} == {"a": "success", "b": "success", "c": "success"}
    refused = scripted_api.requests[0]
    others = [task_id for task_id in "abc" if f"/{task_id}" != refused.path]
    assert all(result.task(task_id).reschedules >= 1 for task_id in others), "the others waited at the gate"
    blocked_until = refused.received_at + 3
    assert all(r.received_at >= blocked_until for r in scripted_api.requests[1:]), "nobody sent before the block ended"
    assert sorted(r.path for r in scripted_api.requests) == sorted(["/a", "/b", "/c", refused.path]), (
        "the refused task sent twice, the others once each, after the block"
    )
    assert time.time() - started >= 3


def test_redirect_to_another_host_is_refused_with_the_credentials_kept_home(request, scripted_api):
    with ScriptedApi() as elsewhere:
        scripted_api.script(ScriptedResponse(status=302, headers={"Location": f"{elsewhere.base_url}/steal"}))

        result = run_operator(
            request, scripted_api.base_url.replace("http://", "http://user:s3cret@"), "endpoint='/api/users'"
        )

        assert result.task("request").state == "failed"
        assert result.task("request").try_number == 1, "a refused redirect is permanent"
        assert elsewhere.request_count == 0, "nothing, and no credential, went to the other host"


def test_redirect_on_the_same_host_is_followed(request, scripted_api):
    scripted_api.script(
        ScriptedResponse(status=301, headers={"Location": "/api/v2/users"}),
        ScriptedResponse(body={"moved": True}),
    )

    result = run_operator(request, scripted_api.base_url, "endpoint='/api/users'")

    assert result.task("request").xcom == {"moved": True}
    assert [r.path for r in scripted_api.requests] == ["/api/users", "/api/v2/users"]


def _run_after_a_1s_and_a_7s_429(request, scripted_api, operator_kwargs: str):
    """Answer 429 Retry-After 1, then 429 Retry-After 7, then 200; run the operator with exactly
    ``operator_kwargs`` (unlike run_operator, nothing added)."""
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse.too_many_requests(retry_after=7),
        ScriptedResponse(body={"ok": True}),
    )
    dag_id = request.node.name
    set_connection(scripted_api.base_url)
    path = write_dag_file(TEST_DAGS_DIR, dag_id, operator_dag_source(dag_id, operator_kwargs, FAST_RETRIES))
    return run_dag(path, dag_id)


def test_by_default_every_wait_is_deferred_and_none_is_slept_in_the_task(request, scripted_api):
    """The default (deferrable, threshold 0): a 1 s and a 7 s wait both go to the triggerer."""
    from tests.integration_airflow.airflow_helpers import delete_variable, read_variable

    history_key = "network_requests.waits.network_request_api"
    delete_variable(history_key)

    result = _run_after_a_1s_and_a_7s_429(request, scripted_api, "endpoint='/api/users'")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 1
    assert task.reschedules == 0, "deferred, not rescheduled"
    assert [w["mode"] for w in json.loads(read_variable(history_key))] == ["defer", "defer"]
    assert scripted_api.gaps()[0] >= 1.0 and scripted_api.gaps()[1] >= 7.0


def test_without_deferral_a_short_wait_is_slept_in_the_task_and_a_long_one_rescheduled(request, scripted_api):
    result = _run_after_a_1s_and_a_7s_429(request, scripted_api, "endpoint='/api/users', deferrable=False")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 1
    assert task.reschedules == 1, "1 s is under the 5 s threshold of the reschedule path, 7 s is not"
    assert scripted_api.gaps()[0] >= 1.0 and scripted_api.gaps()[1] >= 7.0


def test_a_body_trickling_in_forever_is_cut_at_the_request_deadline(request):
    """The read timeout is per socket read; a byte every 0.3 s never trips it. The deadline does."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    bytes_sent = []

    def drip():
        while not stop.is_set():
            listener.settimeout(0.5)
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(200):  # bounded: at most 60 s of dripping
                    if stop.is_set():
                        break
                    try:
                        connection.sendall(b".")
                    except OSError:
                        break
                    bytes_sent.append(1)
                    stop.wait(0.3)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        started = time.time()
        result = run_operator(
            request,
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            "endpoint='/slow', request_timeout=(2, 2), request_deadline=2",
            "{'retries': 0}",
        )
        elapsed = time.time() - started
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()

    assert result.task("request").state == "failed"
    assert 0 < len(bytes_sent) < 100, "the body was still trickling when the deadline cut it"
    assert elapsed < 60


def test_output_path_outside_output_root_fails_before_any_request(request, scripted_api, tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    escaping = str(root / ".." / "escaped.json")

    result = run_operator(
        request, scripted_api.base_url, f"endpoint='/api/users', output_path={escaping!r}, output_root={str(root)!r}"
    )

    assert result.task("request").state == "failed"
    assert result.task("request").try_number == 1, "refused paths are permanent"
    assert scripted_api.request_count == 0
    assert not (tmp_path / "escaped.json").exists()


def test_a_deferral_is_due_no_sooner_than_the_heartbeat_interval(monkeypatch):
    """So the run that deferred has been reported before the task can run again (see min_defer_delay)."""
    from datetime import timedelta

    from airflow.sdk.configuration import conf

    from network_requests.operators import min_defer_delay

    monkeypatch.setattr(conf, "getint", lambda section, key, **kwargs: {("workers", "min_heartbeat_interval"): 1}[(section, key)])
    assert min_defer_delay() == timedelta(seconds=1)
    monkeypatch.setattr(conf, "getint", lambda section, key, **kwargs: {("workers", "min_heartbeat_interval"): 5}[(section, key)])
    assert min_defer_delay() == timedelta(seconds=5)
