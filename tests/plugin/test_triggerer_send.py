"""A deferred wait sends the request from the triggerer (``finish_in_triggerer``, the default).

Through real Airflow (``dag.test()``, which runs the trigger in-line, against a scripted
server on 127.0.0.1), and the pure parts directly. The real triggerer ending the task with
a ``TaskSuccessEvent`` is covered by the reliability suite (case 13) and ``make bench``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.dag_runner import run_operator_task
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")


def _run(request, api_url: str, tmp_path: Path, operator_kwargs: str, default_args: str = "{'retries': 0}"):
    """Run one operator task; return the result and how many times it ran on a worker."""
    worker_runs = tmp_path / "worker_runs"
    # on_execute_callback runs each time the task runs on a worker, a resumption included.
    kwargs = f"{operator_kwargs}, on_execute_callback=lambda context: open({str(worker_runs)!r}, 'a').write('run\\n')"
    result = run_operator_task(request, api_url, kwargs, default_args)
    runs = len(worker_runs.read_text().splitlines()) if worker_runs.exists() else 0
    return result, runs


def _two_429s_then_users(scripted_api) -> None:
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse(body={"users": [1, 2]}),
    )


def test_waits_and_the_request_after_them_happen_in_the_triggerer(request, scripted_api, tmp_path):
    _two_429s_then_users(scripted_api)

    result, worker_runs = _run(request, scripted_api.base_url, tmp_path, "endpoint='/api/users'")

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 1
    assert task.xcom == {"users": [1, 2]}
    assert scripted_api.request_count == 3
    assert min(scripted_api.gaps()) >= 1.0, "never before the Retry-After"
    # The second 429 was waited out in the trigger. Under dag.test() the trigger hands the
    # result back (dag.test() would drop a TaskSuccessEvent's XComs), so the worker runs a
    # second time, only to return it; the real triggerer ends the task itself (case 13).
    assert worker_runs == 2


def test_without_finish_in_triggerer_each_wait_resumes_on_a_worker(request, scripted_api, tmp_path):
    _two_429s_then_users(scripted_api)

    result, worker_runs = _run(request, scripted_api.base_url, tmp_path, "endpoint='/api/users', finish_in_triggerer=False")

    task = result.task("request")
    assert task.state == "success"
    assert task.xcom == {"users": [1, 2]}
    assert worker_runs == 3, "one run, then one resumption per wait"


def test_a_server_error_met_in_the_triggerer_fails_the_try_on_the_worker_without_a_resend(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(status=500, body={"e": 1}))

    result, worker_runs = _run(request, scripted_api.base_url, tmp_path, "endpoint='/api/users'")

    task = result.task("request")
    assert task.state == "failed"
    assert scripted_api.request_count == 2, "the worker raises the triggerer's answer; it does not ask again"
    assert worker_runs == 2


def test_a_server_error_met_in_the_triggerer_is_retried_like_any_other(request, scripted_api, tmp_path):
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse(status=503, body={"e": 1}),
        ScriptedResponse(body={"ok": True}),
    )

    result, _ = _run(
        request, scripted_api.base_url, tmp_path, "endpoint='/api/users'",
        "{'retries': 1, 'retry_delay': timedelta(seconds=1)}",
    )

    task = result.task("request")
    assert task.state == "success"
    assert task.try_number == 2
    assert len(task.earlier_tries) == 1, "one earlier, failed try"
    assert task.xcom == {"ok": True}
    assert scripted_api.request_count == 3


def test_a_client_error_met_in_the_triggerer_fails_at_once_despite_retries(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(status=404, body={"e": 1}))

    result, _ = _run(
        request, scripted_api.base_url, tmp_path, "endpoint='/api/users'",
        "{'retries': 3, 'retry_delay': timedelta(seconds=1)}",
    )

    task = result.task("request")
    assert task.state == "failed"
    assert task.try_number == 1, "a 404 is permanent: no retry, wherever it was met"
    assert scripted_api.request_count == 2


# --------------------------------------------------------------------------
# The pure parts.
# --------------------------------------------------------------------------


def _operator(**kwargs):
    from network_requests import NetworkRequestOperator

    return NetworkRequestOperator(task_id="t", endpoint="/x", **kwargs)


def test_the_operators_own_behaviour_finishes_in_the_triggerer_by_default():
    assert _operator().finishes_in_triggerer()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deferrable": False},
        {"finish_in_triggerer": False},
        {"response_check": lambda response: True},
        {"response_filter": lambda response: response.text},
        {"output_path": "/tmp/somewhere"},
        {"data": {"when": datetime(2026, 1, 1)}},  # not JSON: cannot go into the trigger's kwargs
    ],
    ids=["reschedule", "opted_out", "response_check", "response_filter", "output_path", "not_json"],
)
def test_what_the_triggerer_cannot_run_waits_there_and_sends_from_a_worker(kwargs):
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    operator = _operator(**kwargs)
    assert not operator.finishes_in_triggerer()
    if operator.deferrable:
        trigger = operator._wait_trigger(datetime.now(timezone.utc), {"ti": None}, 0, None)
        assert isinstance(trigger, DateTimeTrigger)


def test_a_subclass_that_changes_what_a_response_means_sends_from_a_worker():
    from network_requests import NetworkRequestOperator

    class Custom(NetworkRequestOperator):
        def classify_response(self, response):
            return super().classify_response(response)

    assert not Custom(task_id="t").finishes_in_triggerer()


def test_the_trigger_round_trips_through_its_serialised_form_and_hides_its_kwargs_from_logs():
    from network_requests.triggers import CLASSPATH, RateLimitedRequestTrigger

    operator = _operator(headers={"X-Api-Key": "s3cr3t"}, request_timeout=(2.0, 5.0))
    moment = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    task_ref = {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": 3}
    trigger = RateLimitedRequestTrigger(moment, operator.triggerer_kwargs(), task_ref, 2, "2026-11-28T11:59:00+00:00")

    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    again = RateLimitedRequestTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert kwargs["operator_kwargs"]["request_timeout"] == [2.0, 5.0]
    assert "s3cr3t" not in repr(trigger)
    assert "d.t[3]" in repr(trigger)


def test_the_triggerer_side_operator_keeps_every_setting():
    from network_requests.triggers import TriggererSideOperator

    operator = _operator(
        method="POST", data={"a": 1}, headers={"X": "1"}, max_rate_limit_wait=30, rate_limit_timeout=600,
        request_timeout=(2.0, 5.0), request_deadline=20, max_response_bytes=1000, rate_limit_jitter=0.0,
        shared_gate=False, retry_delay=timedelta(seconds=7), retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=1),
    )
    rebuilt = TriggererSideOperator(task_id="t", deferrable=True, in_process_wait_threshold=0,
                                    **operator.triggerer_kwargs())
    for name in ("method", "data", "headers", "max_rate_limit_wait", "rate_limit_timeout", "request_timeout",
                 "request_deadline", "max_response_bytes", "rate_limit_jitter", "shared_gate", "retry_delay",
                 "retry_exponential_backoff", "max_retry_delay", "endpoint", "http_conn_id"):
        assert getattr(rebuilt, name) == getattr(operator, name), name
    assert rebuilt._minimum_delay() == timedelta(0), "no executor race inside the trigger"


@pytest.mark.parametrize(
    "error_name, retried",
    [
        ("TransientRequestError", True),
        ("PermanentRequestError", False),
        ("ResponseTooLargeError", False),
        ("ResponseCheckFailed", True),
        ("RateLimitExceededError", False),
    ],
)
def test_a_failure_keeps_its_type_and_retry_meaning_across_the_hand_back(error_name, retried):
    from airflow.sdk.exceptions import AirflowFailException

    from network_requests import exceptions

    error_class = getattr(exceptions, error_name)
    facts = {"method": "GET", "url": "http://127.0.0.1:1/x", "status_code": 500}
    original = (
        error_class("boom", wait_seconds=12.5, **facts) if error_class is exceptions.RateLimitExceededError
        else error_class("boom", **facts)
    )

    again = exceptions.failure_from_payload(exceptions.failure_payload(original))

    assert type(again) is error_class
    assert str(again) == "boom"
    assert (again.method, again.url, again.status_code) == ("GET", "http://127.0.0.1:1/x", 500)
    assert isinstance(again, AirflowFailException) is (not retried)
    if error_class is exceptions.RateLimitExceededError:
        assert again.wait_seconds == 12.5


def test_any_other_failure_in_the_triggerer_comes_back_as_a_plain_failure_that_is_retried():
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from network_requests import exceptions

    again = exceptions.failure_from_payload(exceptions.failure_payload(LookupError("no connection 'x'")))

    assert type(again) is AirflowException
    assert not isinstance(again, AirflowFailException)
    assert "LookupError: no connection 'x'" in str(again)
