"""A deferred wait sends the request from the triggerer (``finish_in_triggerer``, the default).

Through real Airflow (``dag.test()``, which runs the trigger in-line, against a scripted
server on 127.0.0.1), and the pure parts directly. The real triggerer ending the task with
a ``TaskSuccessEvent`` is covered by the reliability suite (case 13) and ``make bench``.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.dag_runner import SendCounter, run_operator_task
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")


def _run(request, api_url: str, tmp_path: Path, operator_kwargs: str, default_args: str = "{'retries': 0}",
         connection: str | None = None):
    """Run one operator task; return the result and how many times it ran on a worker."""
    worker_runs = tmp_path / "worker_runs"
    # on_execute_callback runs each time the task runs on a worker, a resumption included.
    kwargs = f"{operator_kwargs}, on_execute_callback=lambda context: open({str(worker_runs)!r}, 'a').write('run\\n')"
    result = run_operator_task(request, api_url, kwargs, default_args, connection=connection)
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
# Where the request is sent from, what the trigger carries, and what it never carries.
# --------------------------------------------------------------------------


def _answer_429_then_ok(scripted_api) -> None:
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))


def test_the_triggerer_reads_the_connections_credentials_itself(request, scripted_api, monkeypatch, tmp_path):
    """Login, password and extra headers come from the Connection in the triggerer, never from the trigger."""
    _answer_429_then_ok(scripted_api)
    sends = SendCounter(monkeypatch)
    host = scripted_api.base_url.replace("http://", "")
    connection = f"http://robot:pa55word@{host}?X-Conn-Key=conn-s3cret"

    result, _ = _run(request, scripted_api.base_url, tmp_path, "endpoint='/api/users'", connection=connection)

    assert result.task("request").state == "success"
    assert (sends.worker, sends.triggerer) == (1, 1)
    second = scripted_api.requests[1]
    assert second.header("Authorization") == "Basic " + base64.b64encode(b"robot:pa55word").decode()
    assert second.header("X-Conn-Key") == "conn-s3cret"


def test_the_description_of_a_request_holds_no_connection_secret(monkeypatch):
    from network_requests.request_spec import TaskRef

    monkeypatch.setenv("AIRFLOW_CONN_NETWORK_REQUEST_API", "http://robot:pa55word@127.0.0.1:1?X-Conn-Key=conn-s3cret")
    operator = _operator(http_conn_id="network_request_api", method="POST", data={"name": "widget"})
    operator.hook.url_from_endpoint("/x")  # the worker has read the Connection by the time it defers

    stored = json.dumps(operator.request_spec(TaskRef("d", "r", "t")).to_dict())

    assert "pa55word" not in stored and "conn-s3cret" not in stored and "robot" not in stored
    assert "Idempotency-Key" in stored, "the key is no secret: it is derived from public ids"


@pytest.mark.parametrize(
    "operator_kwargs, hidden",
    [
        ("headers={'Authorization': 'Bearer tok-123456'}", "tok-123456"),
        ("headers={'X-API-Key': 'key-123456'}", "key-123456"),
        ("endpoint='/api/users?api_key=key-123456'", "key-123456"),
        ("method='POST', data={'client_secret': 'sec-123456'}", "sec-123456"),
    ],
    ids=["authorization", "x_api_key", "query_api_key", "body_secret"],
)
def test_a_request_carrying_a_secret_waits_in_the_triggerer_and_sends_from_the_worker(
    request, scripted_api, monkeypatch, tmp_path, operator_kwargs, hidden
):
    _answer_429_then_ok(scripted_api)
    sends = SendCounter(monkeypatch)
    if "endpoint=" not in operator_kwargs:
        operator_kwargs += ", endpoint='/api/users'"

    result, worker_runs = _run(request, scripted_api.base_url, tmp_path, operator_kwargs)

    assert result.task("request").state == "success"
    assert (sends.worker, sends.triggerer) == (2, 0), "the worker sent both requests"
    assert worker_runs == 2, "it waited deferred, not in the worker"
    second = scripted_api.requests[1]
    assert hidden in (second.header("Authorization") or "") + (second.header("X-API-Key") or "") + second.query + second.body.decode()


def test_a_connection_behind_a_proxy_sends_from_the_worker(request, scripted_api, monkeypatch, tmp_path):
    """aiohttp does not take requests' proxies: the triggerer hands the request to a worker."""
    _answer_429_then_ok(scripted_api)
    sends = SendCounter(monkeypatch)
    # The scripted server answers a proxy's absolute-form requests too: it is the proxy here.
    extra = json.dumps({"proxies": {"http": scripted_api.base_url}})
    connection = json.dumps({"conn_type": "http", "host": "api.example.invalid", "extra": extra})

    result, _ = _run(request, scripted_api.base_url, tmp_path, "endpoint='/api/users'", connection=connection)

    assert result.task("request").state == "success"
    assert (sends.worker, sends.triggerer) == (2, 0)
    assert [r.path for r in scripted_api.requests] == ["/api/users", "/api/users"]


@pytest.mark.parametrize("finish_in_triggerer", [True, False], ids=["triggerer", "worker"])
@pytest.mark.parametrize(
    "second, state",
    [
        (ScriptedResponse(body="x" * 5000), "failed"),  # max_response_bytes=1000
        (ScriptedResponse(status=302, headers={"Location": "http://127.0.0.2:9/steal"}), "failed"),
        (ScriptedResponse(status=302, headers={"Location": "/api/v2/users"}), "success"),
    ],
    ids=["too_large", "redirect_elsewhere", "redirect_same_origin"],
)
def test_the_caps_are_the_same_in_the_triggerer_and_on_the_worker(
    request, scripted_api, monkeypatch, tmp_path, finish_in_triggerer, second, state
):
    scripted_api.default_response = ScriptedResponse(body={"moved": True})
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), second)
    sends = SendCounter(monkeypatch)

    result, _ = _run(request, scripted_api.base_url, tmp_path,
                     f"endpoint='/api/users', max_response_bytes=1000, finish_in_triggerer={finish_in_triggerer}")

    task = result.task("request")
    assert (task.state, task.try_number) == (state, 1), "permanent failures are not retried, wherever met"
    assert sends.triggerer == (1 if finish_in_triggerer else 0)
    if state == "success":
        assert task.xcom == {"moved": True}
        assert [r.path for r in scripted_api.requests] == ["/api/users", "/api/users", "/api/v2/users"]
    else:
        assert scripted_api.request_count == 2, "nothing followed to another host"


def test_the_request_deadline_cuts_a_trickling_body_in_the_triggerer_too(request, monkeypatch, tmp_path):
    from tests.support.scripted_api import ScriptedApi

    with ScriptedApi() as api:
        api.script(ScriptedResponse.too_many_requests(retry_after=1),
                   ScriptedResponse(body="x", headers={"Content-Length": "100000"}, delay_s=0.0))
        # A Content-Length far larger than the body: the client keeps reading until the deadline.
        sends = SendCounter(monkeypatch)
        started = time.monotonic()
        result, _ = _run(request, api.base_url, tmp_path, "endpoint='/slow', request_timeout=(5, 30), request_deadline=2")

    assert result.task("request").state == "failed"
    assert sends.triggerer == 1
    assert time.monotonic() - started < 30, "cut at the 2 s deadline, not at the 30 s read timeout"


def _operator(**kwargs):
    from network_requests import NetworkRequestOperator

    kwargs.setdefault("endpoint", "/x")
    return NetworkRequestOperator(task_id="t", **kwargs)


def test_the_operators_own_behaviour_finishes_in_the_triggerer_by_default():
    assert _operator().finishes_in_triggerer()
    assert _operator(method="POST", data={"author": "ada"}).finishes_in_triggerer(), "'author' is not 'auth'"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deferrable": False},
        {"finish_in_triggerer": False},
        {"response_check": lambda response: True},
        {"response_filter": lambda response: response.text},
        {"output_path": "/tmp/somewhere"},
        {"data": {"when": datetime(2026, 1, 1)}},  # not JSON: cannot go into the trigger's kwargs
        {"headers": {"Authorization": "Bearer x"}},
        {"headers": {"Cookie": "session=abc"}},
        {"endpoint": "/x?token=abc"},
        {"extra_options": {"proxies": {"https": "http://user:pw@proxy:3128"}}},
    ],
    ids=["reschedule", "opted_out", "response_check", "response_filter", "output_path", "not_json",
         "authorization", "cookie", "token_in_query", "proxy_password"],
)
def test_what_the_triggerer_cannot_run_waits_there_and_sends_from_a_worker(kwargs):
    from network_requests.engine import Mode, Wait, WaitBudget
    from network_requests.operators import _WORKER_ONLY, NetworkRequestOperator
    from network_requests.rate_limit import WaitSource
    from network_requests.request_spec import TaskRef
    from network_requests.where_to_send import deferral_trigger

    operator = _operator(**kwargs)
    assert not operator.finishes_in_triggerer()
    if operator.deferrable:
        now = datetime.now(timezone.utc)
        budget = WaitBudget(rate_limit_waits=3, immediate_in_a_row=2, waiting_since=now)
        step = Wait(now, now, 0.0, WaitSource.RETRY_AFTER, Mode.DEFER, budget)
        trigger = deferral_trigger(operator, NetworkRequestOperator, step, TaskRef("d", "r", "t"), worker_only=_WORKER_ONLY)
        _, stored = trigger.serialize()
        assert stored["request"] is None, "a trigger that only waits: nothing of the request is stored"
        assert WaitBudget.from_dict(stored["budget"]) == budget


def test_a_subclass_that_changes_what_a_response_means_sends_from_a_worker():
    from network_requests import NetworkRequestOperator

    class Custom(NetworkRequestOperator):
        def classify_response(self, response):
            return super().classify_response(response)

    assert not Custom(task_id="t").finishes_in_triggerer()


def test_a_seam_replaced_on_the_instance_sends_from_a_worker_but_the_cached_defaults_do_not():
    from network_requests.gate_store import MemoryGateStore

    operator = _operator()
    operator.hook  # noqa: B018 - the cached default, as a run leaves it
    assert operator.finishes_in_triggerer()
    operator.gate_store = MemoryGateStore()
    assert not operator.finishes_in_triggerer()
    clocked = _operator()
    clocked.clock = lambda: datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert not clocked.finishes_in_triggerer()


def test_the_trigger_round_trips_through_its_serialised_form_and_keeps_the_body_out_of_its_repr():
    from network_requests.engine import WaitBudget
    from network_requests.request_spec import TaskRef
    from network_requests.triggers import CLASSPATH, RateLimitedRequestTrigger

    operator = _operator(method="POST", data={"note": "private-ish"}, request_timeout=(2.0, 5.0))
    moment = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    spec = operator.request_spec(TaskRef("d", "r", "t", 3))
    budget = WaitBudget(rate_limit_waits=2, waiting_since=moment)
    trigger = RateLimitedRequestTrigger(moment, spec.to_dict(), budget.to_dict())

    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    again = RateLimitedRequestTrigger(**json.loads(json.dumps({**kwargs, "moment": None}, default=str)) | {"moment": moment})
    assert again.serialize() == (classpath, kwargs)
    assert kwargs["request"]["request_timeout"] == [2.0, 5.0]
    assert "private-ish" not in repr(trigger)
    assert "d.t[3]" in repr(trigger)


def test_the_description_keeps_every_setting_the_triggerer_needs():
    from network_requests.engine import Place
    from network_requests.request_spec import RequestSpec, TaskRef

    operator = _operator(
        method="POST", data={"a": 1}, headers={"X": "1"}, max_rate_limit_wait=30, rate_limit_timeout=600,
        request_timeout=(2.0, 5.0), request_deadline=20, max_response_bytes=1000, rate_limit_jitter=0.0,
        shared_gate=False, retry_delay=timedelta(seconds=7), retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=1), extra_options={"verify": False},
    )
    spec = RequestSpec.from_dict(json.loads(json.dumps(operator.request_spec(TaskRef("d", "r", "t")).to_dict())))

    assert (spec.method, spec.endpoint, spec.conn_id, spec.data) == ("POST", "/x", operator.http_conn_id, {"a": 1})
    assert spec.headers["X"] == "1" and "Idempotency-Key" in spec.headers
    assert (spec.timeout, spec.request_deadline, spec.max_response_bytes) == ((2.0, 5.0), 20.0, 1000)
    assert (spec.shared_gate, spec.extra_options) == (False, {"verify": False})
    in_triggerer, on_worker = spec.waits.rules(Place.TRIGGERER), operator._rules()
    for name in ("backoff", "max_single_wait", "total_timeout"):
        assert getattr(in_triggerer, name) == getattr(on_worker, name), name
    assert in_triggerer.min_leave_delay == timedelta(0), "no executor race inside the trigger"


def test_a_trigger_stored_by_the_earlier_plugin_waits_and_hands_the_request_to_a_worker():
    import asyncio

    from network_requests.triggers import RateLimitedRequestTrigger

    old = RateLimitedRequestTrigger(
        moment=datetime.now(timezone.utc), operator_kwargs={"endpoint": "/x"},
        task_ref={"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1},
        rate_limit_waits=2, waiting_since="2026-01-01T00:00:00+00:00", push_xcom=True,
    )

    event = asyncio.run(anext(old.run()))

    assert event.payload["resume"]["rate_limit_waits"] == 2
    assert event.payload["resume"]["waiting_since"] == "2026-01-01T00:00:00+00:00"


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


def test_a_failure_that_fails_at_once_on_a_worker_fails_at_once_after_the_hand_back_too():
    """A bad gate setting met in the triggerer (a Connection's extra edited since the deferral,
    say) is an AirflowFailException there: the worker raises it without spending a retry."""
    from airflow.sdk.exceptions import AirflowFailException

    from network_requests import exceptions
    from network_requests.gate_access import GateSettingsError

    again = exceptions.failure_from_payload(exceptions.failure_payload(GateSettingsError("bad rate_limit")))

    assert isinstance(again, AirflowFailException)
    assert "GateSettingsError: bad rate_limit" in str(again)
