"""No hammering: ``Retry-After: 0`` is retried at once only once in a row, through real Airflow.

``dag.test()`` against a scripted server on 127.0.0.1, on every path a wait can take: in
the triggerer (the default), on the worker after a deferral (``finish_in_triggerer=False``),
and in the task on the reschedule path (``deferrable=False``).
"""

from __future__ import annotations

import pytest

from tests.support.dag_runner import SendCounter, run_operator_task
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

WHERE = {
    "triggerer": "",
    "worker_after_deferral": ", finish_in_triggerer=False",
    "reschedule_path": ", deferrable=False",
}


def _retry_after_zero() -> ScriptedResponse:
    return ScriptedResponse.too_many_requests(retry_after=0)


@pytest.mark.parametrize("where", list(WHERE))
def test_retry_after_zero_once_is_sent_again_at_once_and_succeeds(request, scripted_api, where):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), _retry_after_zero(),
                        ScriptedResponse(body={"ok": True}))

    result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/users'" + WHERE[where],
                               "{'retries': 0, 'retry_delay': timedelta(seconds=30)}")

    task = result.task("request")
    assert (task.state, task.try_number, task.xcom) == ("success", 1, {"ok": True})
    assert [r.response.headers.get("Retry-After") for r in scripted_api.requests[:2]] == ["1", "0"]
    assert scripted_api.gaps()[1] < 30, "sent again without the 30 s retry_delay backoff"


@pytest.mark.parametrize("where", list(WHERE))
def test_retry_after_zero_forever_gets_a_bounded_number_of_requests_and_ends_at_rate_limit_timeout(
    request, scripted_api, monkeypatch, where
):
    """retry_delay 1 s, factor 2: sends at about 0, 0, 1, 3, 7 s; the next wait (8 s) would pass
    the 12 s rate_limit_timeout, so the task fails there, without a retry."""
    scripted_api.default_response = _retry_after_zero()
    sends = SendCounter(monkeypatch)

    result = run_operator_task(
        request, scripted_api.base_url, "endpoint='/api/users', rate_limit_timeout=12, rate_limit_jitter=0" + WHERE[where],
        "{'retries': 2, 'retry_delay': timedelta(seconds=1), 'retry_exponential_backoff': 2.0}",
    )

    task = result.task("request")
    received = scripted_api.requests
    assert all(r.response.status == 429 and r.response.headers["Retry-After"] == "0" for r in received), (
        "the server really answered 429, Retry-After: 0 every time"
    )
    assert (task.state, task.try_number) == ("failed", 1), "RateLimitExceededError: no retry would help"
    # One immediate retry, then backoffs of 1, 2 and 4 s. A deferral that resumes on a worker
    # is due no sooner than min_defer_delay (the heartbeat, 5 s here): its waits are longer,
    # so it makes fewer requests before rate_limit_timeout.
    assert len(received) == 5 or (where == "worker_after_deferral" and 3 <= len(received) < 5), len(received)
    backoffs = [1.0, 2.0, 4.0]
    assert all(gap >= backoff for gap, backoff in zip(scripted_api.gaps()[1:], backoffs)), scripted_api.gaps()
    # The immediate retry is slept in the worker (0 s); the backoffs go where waits go.
    expected = (2, 3) if where == "triggerer" else (len(received), 0)
    assert (sends.worker, sends.triggerer) == expected
    spread = received[-1].received_monotonic - received[0].received_monotonic
    assert spread <= 12, "five requests in all, within rate_limit_timeout: far fewer than one a second"
