"""``GitHubApiOperator`` against a scripted server that answers like api.github.com (``dag.test()``)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from network_requests.github import GitHubApiOperator, follow_link_next, mentions_rate_limit, next_page_url
from network_requests.rate_limit import Outcome, WaitSource
from tests.integration_airflow.airflow_helpers import dag_id_for, delete_variable, one_task_dag, read_variable, run_source
from tests.support.scripted_api import ScriptedApi, ScriptedResponse

GITHUB_HEADERS = {"X-RateLimit-Limit": "5000", "X-RateLimit-Resource": "core"}


def page(items: list, *, next_url: str | None = None, remaining: int = 4999) -> ScriptedResponse:
    headers = {**GITHUB_HEADERS, "X-RateLimit-Remaining": str(remaining), "X-RateLimit-Reset": str(int(time.time()) + 3600)}
    if next_url:
        headers["Link"] = f'<{next_url}>; rel="next", <{next_url}&last=1>; rel="last"'
    return ScriptedResponse(body=items, headers=headers)


def github_dag(dag_id: str, operator_kwargs: str, default_args: str = "{'retries': 0}") -> str:
    return one_task_dag(
        dag_id,
        f"GitHubApiOperator(task_id='gh', http_conn_id='network_request_api', {operator_kwargs})",
        default_args=default_args,
        imports="from network_requests.github import GitHubApiOperator",
    )


pytestmark = pytest.mark.usefixtures("airflow_db")


def test_follows_link_next_across_three_pages_and_combines_the_items(request, scripted_api):
    base = scripted_api.base_url
    scripted_api.script(
        page([1, 2], next_url=f"{base}/repos/o/r/issues?page=2&per_page=2"),
        page([3, 4], next_url=f"{base}/repos/o/r/issues?page=3&per_page=2"),
        page([5]),
    )
    dag_id = dag_id_for(request)

    result = run_source(dag_id, github_dag(dag_id, "endpoint='/repos/o/r/issues', per_page=2"), base_url=base)

    task = result.task("gh")
    assert task.state == "success"
    assert task.xcom == [1, 2, 3, 4, 5]
    sent = scripted_api.requests
    assert [(r.path, r.query) for r in sent] == [
        ("/repos/o/r/issues", "per_page=2"),
        ("/repos/o/r/issues", "page=2&per_page=2"),
        ("/repos/o/r/issues", "page=3&per_page=2"),
    ]
    assert all(r.header("Accept") == "application/vnd.github+json" for r in sent)
    assert all(r.header("X-GitHub-Api-Version") == "2022-11-28" for r in sent)


def test_stops_at_max_pages(request, scripted_api):
    base = scripted_api.base_url
    scripted_api.script(
        page([1], next_url=f"{base}/items?page=2"),
        page([2], next_url=f"{base}/items?page=3"),
        page([3], next_url=f"{base}/items?page=4"),
    )
    dag_id = dag_id_for(request)
    result = run_source(dag_id, github_dag(dag_id, "endpoint='/items', max_pages=2"), base_url=base)
    assert result.task("gh").xcom == [1, 2]
    assert scripted_api.request_count == 2


def test_a_next_link_to_another_host_is_refused_and_never_requested(request, scripted_api):
    with ScriptedApi() as other_host:
        scripted_api.script(page([1], next_url=f"{other_host.base_url}/items?page=2"))
        dag_id = dag_id_for(request)

        result = run_source(dag_id, github_dag(dag_id, "endpoint='/items'", "{'retries': 1}"),
                            base_url=scripted_api.base_url)

        task = result.task("gh")
        assert task.state == "failed", "a listing cut short by a foreign link is not a success"
        assert task.try_number == 1, "refused for good, not retried"
        assert scripted_api.request_count == 1
        assert other_host.request_count == 0


def test_a_long_rate_limit_between_pages_defers_and_goes_on_at_the_page_it_stopped_at(request, scripted_api):
    """Deferred (the default): the task leaves its worker; page 1, kept on disk, is not fetched again."""
    base = scripted_api.base_url
    scripted_api.script(
        page([1], next_url=f"{base}/items?page=2"),
        ScriptedResponse(status=403, headers={**GITHUB_HEADERS, "X-RateLimit-Remaining": "4000", "Retry-After": "2"},
                         body={"message": "You have exceeded a secondary rate limit."}),
        page([2], next_url=f"{base}/items?page=3"),
        page([3]),
    )
    history_key = "network_requests.waits.network_request_api"
    delete_variable(history_key)
    dag_id = dag_id_for(request)

    result = run_source(dag_id, github_dag(dag_id, "endpoint='/items'"), base_url=base)

    task = result.task("gh")
    assert [wait["mode"] for wait in json.loads(read_variable(history_key))] == ["defer"], "the task left its worker"
    assert task.state == "success" and task.try_number == 1
    assert [r.query for r in scripted_api.requests] == ["", "page=2", "page=2", "page=3"]
    assert task.xcom == [1, 2, 3]


def test_primary_limit_remaining_zero_waits_until_the_reset_epoch(request, scripted_api):
    reset_epoch = int(time.time()) + 4
    scripted_api.script(
        ScriptedResponse(
            status=403,
            headers={**GITHUB_HEADERS, "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_epoch)},
            body={"message": "API rate limit exceeded for user ID 1."},
        ),
        page([{"id": 1}]),
    )
    dag_id = dag_id_for(request)

    result = run_source(
        dag_id, github_dag(dag_id, "endpoint='/user/repos', deferrable=False, in_process_wait_threshold=0"), base_url=scripted_api.base_url
    )

    task = result.task("gh")
    assert task.state == "success"
    assert task.try_number == 1 and task.reschedules == 1, "a rate limit reschedules, no try spent"
    assert scripted_api.requests[1].received_at >= reset_epoch


def test_secondary_limit_403_with_retry_after_is_a_rate_limit(request, scripted_api):
    scripted_api.script(
        ScriptedResponse(
            status=403,
            headers={**GITHUB_HEADERS, "X-RateLimit-Remaining": "4000", "Retry-After": "2"},
            body={"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."},
        ),
        page([{"id": 1}]),
    )
    dag_id = dag_id_for(request)

    result = run_source(dag_id, github_dag(dag_id, "endpoint='/search/code?q=x'"), base_url=scripted_api.base_url)

    task = result.task("gh")
    assert task.state == "success"
    assert task.try_number == 1
    assert scripted_api.gaps()[0] >= 2.0


def test_a_rate_limit_between_pages_is_waited_out_and_the_pages_kept(request, scripted_api):
    """A short wait mid-pagination is slept in the task."""
    base = scripted_api.base_url
    scripted_api.script(
        page([1], next_url=f"{base}/items?page=2"),
        ScriptedResponse(status=429, headers={"Retry-After": "1"}, body={"message": "secondary rate limit"}),
        page([2]),
    )
    dag_id = dag_id_for(request)

    result = run_source(
        dag_id, github_dag(dag_id, "endpoint='/items', in_process_wait_threshold=5"), base_url=base
    )

    assert result.task("gh").xcom == [1, 2]
    assert [r.query for r in scripted_api.requests] == ["", "page=2", "page=2"]
    assert scripted_api.gaps()[1] >= 1.0


# -- the overrides on their own ---------------------------------------------------------------


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.headers.update(headers or {})
    r._content = body
    return r


def test_a_secondary_limit_without_any_header_is_still_a_rate_limit_of_at_least_a_minute():
    from datetime import datetime, timezone

    operator = GitHubApiOperator(task_id="t", endpoint="/x", retry_delay=5)
    limited = response(403, body=b'{"message": "You have exceeded a secondary rate limit."}')
    assert mentions_rate_limit(limited)
    assert operator.classify_response(limited) is Outcome.RATE_LIMITED
    assert operator.classify_response(response(403, body=b'{"message": "Resource not accessible"}')) is Outcome.PERMANENT
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    first = operator.rate_limit_wait(limited, now=now, consecutive_waits=0)
    second = operator.rate_limit_wait(limited, now=now, consecutive_waits=1)
    assert (first.source, first.seconds, second.seconds) == (WaitSource.BACKOFF, 60.0, 120.0)


def test_next_page_url_reads_the_link_header():
    linked = response(200, {"Link": '<https://api.github.com/x?page=2>; rel="next", <https://api.github.com/x?page=9>; rel="last"'})
    assert next_page_url(linked) == "https://api.github.com/x?page=2"
    assert next_page_url(response(200)) is None


def test_follow_link_next_asks_for_the_linked_url_with_its_own_query_only():
    linked = response(200, {"Link": '<https://api.github.com/x?page=2&per_page=5>; rel="next"'})
    assert follow_link_next(linked) == {"endpoint": "https://api.github.com/x?page=2&per_page=5", "data": None}
    assert follow_link_next(response(200)) is None
