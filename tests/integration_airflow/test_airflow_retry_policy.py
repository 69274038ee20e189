"""``RetryAfterPolicy`` (an ``airflow.sdk.RetryPolicy``) on operators that know nothing of rate limits.

Unit tests of the decision, then real runs (``dag.test()``) of a stock ``HttpOperator`` and of
a ``@task`` calling ``requests``, against a scripted server: the retry comes after exactly the
server's ``Retry-After`` even though the task's own ``retry_delay`` is 5 minutes.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
import requests
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.definitions.retry_policy import RetryAction

from network_requests.retry_policy import RetryAfterPolicy, response_of
from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source
from tests.support.scripted_api import ScriptedResponse

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)


def fake_response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    response.reason = "Too Many Requests" if status == 429 else "Error"
    response.url = "http://127.0.0.1:9/api"
    return response


def http_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = fake_response(status, headers)
    return requests.HTTPError(f"{status} Client Error", response=response)


def as_http_hook_raises(error: requests.HTTPError) -> AirflowException:
    """What HttpHook.check_response (providers-http 6.3) raises: AirflowException inside `except HTTPError`."""
    try:
        try:
            raise error
        except requests.HTTPError:
            raise AirflowException(f"{error.response.status_code}:{error.response.reason}")  # noqa: B904 - as HttpHook does
    except AirflowException as raised:
        return raised


@pytest.fixture
def policy() -> RetryAfterPolicy:
    policy = RetryAfterPolicy()
    policy.clock = lambda: NOW
    return policy


def test_requests_http_error_with_retry_after_seconds_retries_after_exactly_that(policy):
    decision = policy.evaluate(http_error(429, {"Retry-After": "17"}), try_number=1, max_tries=3)
    assert decision.action is RetryAction.RETRY
    assert decision.retry_delay == timedelta(seconds=17)
    assert "Retry-After" in decision.reason and "spends a try" in decision.reason


def test_http_hook_exception_is_followed_to_the_response_in_its_context(policy):
    exception = as_http_hook_raises(http_error(429, {"Retry-After": "5"}))
    assert response_of(exception) is exception.__context__.response
    assert policy.evaluate(exception, 1, 3).retry_delay == timedelta(seconds=5)


def test_http_date_is_measured_against_the_servers_date_header(policy):
    headers = {
        "Retry-After": format_datetime(NOW + timedelta(seconds=90), usegmt=True),
        "Date": format_datetime(NOW + timedelta(seconds=30), usegmt=True),  # the server's clock is ahead
    }
    assert policy.evaluate(http_error(503, headers), 1, 3).retry_delay == timedelta(seconds=60)


def test_spent_quota_reset_header_is_used_without_retry_after(policy):
    reset = int((NOW + timedelta(seconds=42)).timestamp())
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}
    assert policy.evaluate(http_error(403, headers), 1, 3).retry_delay == timedelta(seconds=42)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        pytest.param({"Retry-After": "1.5"}, 1.5, id="decimal-retry-after"),
        pytest.param({"Retry-After": "20, 20"}, 20, id="retry-after-sent-twice"),
        pytest.param(
            {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int((NOW + timedelta(seconds=42)).timestamp()) * 1000)},
            42,
            id="reset-in-epoch-milliseconds",
        ),
        pytest.param({"RateLimit": '"default";r=0;t=9, "burst";r=3;t=1'}, 9, id="structured-ratelimit"),
    ],
)
def test_every_header_form_the_reader_knows_sets_the_retry_delay(policy, headers, seconds):
    decision = policy.evaluate(http_error(429, headers), 1, 3)
    assert (decision.action, decision.retry_delay) == (RetryAction.RETRY, timedelta(seconds=seconds))


def test_a_ten_year_retry_after_is_not_believed_and_airflows_default_applies(policy, caplog):
    decision = policy.evaluate(http_error(429, {"Retry-After": str(10 * 365 * 24 * 3600)}), 1, 3)
    assert decision.action is RetryAction.DEFAULT
    assert "beyond 7 days" in caplog.text


@pytest.mark.parametrize(
    "exception",
    [
        ValueError("no response at all"),
        http_error(429),  # rate limited, but the server said nothing about when
        http_error(500, {"Retry-After": "3"}),  # not a rate limit
        http_error(404),
        http_error(429, {"Retry-After": "soon"}),  # unreadable
    ],
    ids=["no-response", "429-no-header", "500", "404", "malformed"],
)
def test_anything_else_keeps_airflows_default_behaviour(policy, exception):
    assert policy.evaluate(exception, 1, 3).action is RetryAction.DEFAULT


def test_a_wait_beyond_max_wait_fails_instead_of_retrying_early(policy):
    decision = policy.evaluate(http_error(429, {"Retry-After": "7200"}), 1, 3)
    assert decision.action is RetryAction.FAIL
    assert "max_wait" in decision.reason
    lenient = RetryAfterPolicy(max_wait=timedelta(minutes=1), on_too_long=RetryAction.DEFAULT)
    assert lenient.evaluate(http_error(429, {"Retry-After": "120"}), 1, 3).action is RetryAction.DEFAULT


def test_min_wait_and_serialization_round_trip():
    policy = RetryAfterPolicy(max_wait=timedelta(minutes=10), min_wait=timedelta(seconds=2))
    assert policy.evaluate(http_error(429, {"Retry-After": "0"}), 1, 3).retry_delay == timedelta(seconds=2)
    again = RetryAfterPolicy.deserialize(policy.serialize())
    assert (again.max_wait, again.min_wait, again.on_too_long) == (policy.max_wait, policy.min_wait, policy.on_too_long)


# -- real runs ---------------------------------------------------------------------------

SLOW_DEFAULT_RETRIES = "{'retries': 2, 'retry_delay': timedelta(minutes=5)}"


@pytest.mark.usefixtures("airflow_db")
def test_stock_http_operator_retries_after_retry_after_not_retry_delay(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=3), ScriptedResponse(body={"ok": True}))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        HttpOperator(
            task_id="call",
            http_conn_id="network_request_api",
            endpoint="/api/users",
            method="GET",
            retry_policy=RetryAfterPolicy(),
            deferrable=False,  # stock; the tests' [operators] default_deferrable is true
        )
        """,
        default_args=SLOW_DEFAULT_RETRIES,
        imports="""
        from airflow.providers.http.operators.http import HttpOperator
        from network_requests.retry_policy import RetryAfterPolicy
        """,
    )
    started = time.monotonic()

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    task = result.task("call")
    assert task.state == "success"
    assert task.try_number == 2, "a retry policy spends a try (the operator would reschedule instead)"
    assert scripted_api.request_count == 2
    assert scripted_api.gaps()[0] >= 3.0, "retried before Retry-After"
    assert time.monotonic() - started < 120, "waited retry_delay (5 min) instead of Retry-After"


@pytest.mark.usefixtures("airflow_db")
def test_task_using_requests_retries_after_an_http_date(request, scripted_api):
    allowed_at = int(time.time()) + 4
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=format_datetime(datetime.fromtimestamp(allowed_at, timezone.utc), usegmt=True)),
        ScriptedResponse(body={"users": [1]}),
    )
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        f"""
        @task(retry_policy=RetryAfterPolicy())
        def call():
            response = requests.get({scripted_api.base_url + "/api/users"!r}, timeout=10)
            response.raise_for_status()
            return response.json()

        call()
        """,
        default_args=SLOW_DEFAULT_RETRIES,
        imports="""
        import requests
        from network_requests.retry_policy import RetryAfterPolicy
        """,
    )

    result = run_source(dag_id, body)

    task = result.task("call")
    assert task.state == "success"
    assert task.try_number == 2
    assert task.xcom == {"users": [1]}
    assert scripted_api.requests[1].received_at >= allowed_at, "retried before the HTTP-date"
