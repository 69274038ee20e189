"""Pagination: the rules (pure), the kept pages (files), and whole listings through real Airflow.

The ``dag.test()`` cases run a ``NetworkRequestOperator`` with a cursor-style
``pagination_function`` against a scripted server on 127.0.0.1 whose answers are played in
order; the server's record of which page each request asked for (``?cursor=``) is what
proves that a kept page was never fetched again.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from network_requests import NetworkRequestOperator
from network_requests.page_checkpoint import KeptPage, PageCheckpoint
from network_requests.pagination import (PageRequest, PaginationError, checked_next_page, combine_pages,
                                         is_last_page, page_idempotency_key, request_of_page)
from network_requests.request_spec import TaskRef
from network_requests.where_to_send import why_send_from_worker
from tests.integration_airflow.airflow_helpers import dag_id_for, delete_variable, one_task_dag, read_variable, run_source
from tests.support.scripted_api import ScriptedApi, ScriptedResponse

BASE = "https://api.example.com/v2"
TASK = TaskRef("dag", "manual__2026-01-01T00:00:00+00:00", "fetch", -1)


# -- the rules ------------------------------------------------------------------------------


def test_next_page_arguments_are_merged_over_the_previous_page_like_http_operator():
    first = PageRequest("/items", data={"q": "x", "filter": {"state": "open"}}, headers={"Accept": "a"},
                        extra_options={"verify": True})

    second = first.followed_by({"data": {"cursor": "c2", "filter": {"label": "bug"}}, "headers": {"X-Page": "2"}})

    assert second == PageRequest("/items", data={"q": "x", "cursor": "c2", "filter": {"state": "open", "label": "bug"}},
                                 headers={"Accept": "a", "X-Page": "2"}, extra_options={"verify": True})
    assert first.data == {"q": "x", "filter": {"state": "open"}}, "the previous request is not changed"


def test_a_given_none_replaces_the_data_so_a_next_url_carries_its_own_query():
    first = PageRequest("/items", data={"per_page": 2})
    assert first.followed_by({"endpoint": "/items?page=2&per_page=2", "data": None}).data is None
    assert first.followed_by({"endpoint": "/items?page=2"}).data == {"per_page": 2}, "an absent key keeps"


def test_the_request_of_a_page_folds_every_earlier_answer_in_order():
    first = PageRequest("/items", data={"q": "x"})
    answers = [{"data": {"cursor": "c2"}}, {"data": {"cursor": "c3"}, "headers": {"X": "1"}}]
    assert request_of_page(first, answers) == PageRequest("/items", data={"q": "x", "cursor": "c3"}, headers={"X": "1"})
    assert request_of_page(first, []) == first


def test_a_full_next_url_on_the_connection_becomes_its_path():
    answer = checked_next_page({"endpoint": f"{BASE}/items?page=2", "data": None}, base_url=BASE)
    assert answer == {"endpoint": "/items?page=2", "data": None}


@pytest.mark.parametrize("endpoint", [
    "https://evil.example/v2/items?page=2",
    "http://api.example.com/v2/items?page=2",  # another scheme is another origin
    "https://api.example.com:8443/v2/items",
    "https://api.example.com/v1/items",  # outside the base path
    "https://api.example.com/v2evil/items",
    "//evil.example/items",
    "/items/../../admin",
    "/items\r\nX-Injected: 1",
])
def test_a_next_page_off_the_connection_is_refused(endpoint):
    with pytest.raises(PaginationError):
        checked_next_page({"endpoint": endpoint}, base_url=BASE)


def test_an_answer_that_cannot_be_followed_or_kept_is_refused_with_the_reason():
    with pytest.raises(PaginationError, match="may return"):
        checked_next_page({"endpoint": "/x", "params": {"a": 1}}, base_url=BASE)
    with pytest.raises(PaginationError, match="dict or None"):
        checked_next_page(["/x"], base_url=BASE)
    with pytest.raises(PaginationError, match="must be a dict"):
        checked_next_page({"headers": "X: 1"}, base_url=BASE)
    with pytest.raises(PaginationError, match="JSON"):
        checked_next_page({"data": {"since": object()}}, base_url=BASE)


def test_none_or_an_empty_answer_means_no_next_page():
    assert checked_next_page(None, base_url=BASE) is None
    assert checked_next_page({}, base_url=BASE) is None


def test_pages_are_combined_as_github_api_operator_always_did():
    assert combine_pages([[1, 2], [3], []]) == [1, 2, 3]
    assert combine_pages([{"a": 1}]) == {"a": 1}, "one page is the page"
    assert combine_pages([{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]
    assert combine_pages([[1], {"a": 2}]) == [[1], {"a": 2}]


def test_the_last_page_is_the_one_without_a_next_or_the_max_pages_th():
    assert is_last_page(3, None, 100)
    assert is_last_page(2, {"data": {"cursor": "c"}}, 2)
    assert not is_last_page(1, {"data": {"cursor": "c"}}, 2)


def test_each_page_has_its_own_idempotency_key_the_same_on_every_send():
    task_key = TASK.idempotency_key
    keys = [page_idempotency_key(task_key, number) for number in (1, 2, 3)]
    assert keys[0] == task_key, "the first page keeps the task's key"
    assert len(set(keys)) == 3
    assert page_idempotency_key(task_key, 2) == keys[1]


def test_a_listing_is_named_by_method_endpoint_and_data_not_by_headers():
    first = PageRequest("/items", data={"q": "x"}, headers={"Authorization": "Bearer a"})
    assert first.fingerprint("get") == PageRequest("/items", {"q": "x"}, {"Authorization": "b"}).fingerprint("GET")
    assert first.fingerprint("GET") != PageRequest("/items", {"q": "y"}).fingerprint("GET")
    assert first.fingerprint("GET") != first.fingerprint("POST")


# -- the kept pages ---------------------------------------------------------------------------


def kept(number: int, next_cursor: str | None) -> KeptPage:
    return KeptPage(number, [number], {"data": {"cursor": next_cursor}} if next_cursor else None, 200,
                    "application/json")


def test_kept_pages_are_read_back_in_order_and_removed_with_their_folders(tmp_path):
    checkpoint = PageCheckpoint(str(tmp_path), TASK, "listing-a")
    checkpoint.keep(kept(1, "c2"))
    checkpoint.keep(kept(2, None))

    assert PageCheckpoint(str(tmp_path), TASK, "listing-a").load() == [kept(1, "c2"), kept(2, None)]
    assert not list(Path(checkpoint.location).glob(".*.partial")), "no temporary file is left"

    checkpoint.remove()
    assert list(tmp_path.iterdir()) == [], "the task instance's folder is gone"


def test_pages_of_another_listing_or_task_instance_are_not_taken_and_are_dropped(tmp_path):
    PageCheckpoint(str(tmp_path), TASK, "listing-a").keep(kept(1, "c2"))

    assert PageCheckpoint(str(tmp_path), TASK, "listing-b").load() == []
    assert not list(Path(PageCheckpoint(str(tmp_path), TASK, "listing-a").location).glob("page-*")), \
        "another listing's pages are removed so they are never mixed in"

    PageCheckpoint(str(tmp_path), TASK, "listing-a").keep(kept(1, "c2"))
    other_map_index = TaskRef(TASK.dag_id, TASK.run_id, TASK.task_id, 3)
    assert PageCheckpoint(str(tmp_path), other_map_index, "listing-a").load() == []
    assert PageCheckpoint(str(tmp_path), TASK, "listing-a").load() == [kept(1, "c2")]


def test_a_damaged_page_ends_what_is_kept_there_and_later_pages_are_dropped(tmp_path):
    checkpoint = PageCheckpoint(str(tmp_path), TASK, "listing-a")
    for number in (1, 2, 3):
        checkpoint.keep(kept(number, f"c{number + 1}"))
    page_2 = Path(checkpoint.location) / "page-00002.json"
    page_2.write_bytes(page_2.read_bytes()[:20])  # as a disk that lost the end of the file would

    assert checkpoint.load() == [kept(1, "c2")]
    assert sorted(path.name for path in Path(checkpoint.location).glob("page-*")) == ["page-00001.json"]


def test_pages_can_be_kept_on_an_object_store_through_object_storage_path():
    checkpoint = PageCheckpoint("memory://pages-bucket/checkpoints", TASK, "listing-a")
    checkpoint.keep(kept(1, "c2"))
    checkpoint.keep(kept(2, None))

    assert PageCheckpoint("memory://pages-bucket/checkpoints", TASK, "listing-a").load() == [kept(1, "c2"), kept(2, None)]
    checkpoint.remove()
    assert PageCheckpoint("memory://pages-bucket/checkpoints", TASK, "listing-a").load() == []


def test_a_task_with_a_pagination_function_sends_its_pages_from_a_worker():
    operator = NetworkRequestOperator(task_id="t", endpoint="/items", pagination_function=lambda response: None)
    assert operator.finishes_in_triggerer() is False
    reason = why_send_from_worker(operator, NetworkRequestOperator, lambda: operator.request_spec(TASK),
                                  worker_only=())
    assert reason is not None and "pagination_function" in reason


def test_max_pages_below_one_is_refused_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="max_pages"):
        NetworkRequestOperator(task_id="t", pagination_function=lambda response: None, max_pages=0)


# -- whole listings through Airflow -------------------------------------------------------------

PAGINATION_FUNCTIONS = '''
def next_cursor(response):
    """The body says which page comes next: {"items": [...], "next": "c2"}."""
    following = response.json().get("next")
    return {"data": {"cursor": following}} if following else None


def items_of(response):
    return response.json()["items"]


def next_link(response):
    following = response.json().get("next_url")
    return {"endpoint": following, "data": None} if following else None
'''


def cursor_page(items: list, following: str | None) -> ScriptedResponse:
    return ScriptedResponse(body={"items": items, "next": following})


def listing_dag(dag_id: str, folder: Path, operator_kwargs: str = "",
                default_args: str = "{'retries': 0}") -> str:
    task = (f"NetworkRequestOperator(task_id='fetch', http_conn_id='network_request_api', endpoint='/items', "
            f"data={{'q': 'all'}}, pagination_function=next_cursor, response_filter=items_of, "
            f"page_checkpoint_folder={str(folder)!r}, {operator_kwargs})")
    return one_task_dag(dag_id, task, default_args=default_args,
                        imports="from network_requests import NetworkRequestOperator\n" + PAGINATION_FUNCTIONS)


def cursors(api: ScriptedApi) -> list[str | None]:
    """Which page each request asked for (None: the first page, which has no cursor)."""
    return [(request.query_params.get("cursor") or [None])[0] for request in api.requests]


def kept_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("page-*.json")) if folder.exists() else []


@pytest.mark.usefixtures("airflow_db")
def test_three_pages_are_read_in_turn_and_their_items_combined(request, scripted_api, tmp_path):
    scripted_api.script(cursor_page([1, 2], "c2"), cursor_page([3, 4], "c3"), cursor_page([5], None))
    dag_id = dag_id_for(request)

    result = run_source(dag_id, listing_dag(dag_id, tmp_path), base_url=scripted_api.base_url)

    task = result.task("fetch")
    assert task.state == "success"
    assert task.xcom == [1, 2, 3, 4, 5]
    assert cursors(scripted_api) == [None, "c2", "c3"]
    assert all(r.query_params["q"] == ["all"] for r in scripted_api.requests), "the next data is merged over the first"
    assert kept_files(tmp_path) == [], "the kept pages are removed once the task succeeded"


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("wait_kwargs, mode", [("", "defer"),
                                               ("deferrable=False, in_process_wait_threshold=0", "reschedule")])
def test_a_429_on_page_two_waits_then_goes_on_at_page_two_without_fetching_page_one_again(
        request, scripted_api, tmp_path, wait_kwargs, mode):
    history_key = "network_requests.waits.network_request_api"
    delete_variable(history_key)
    scripted_api.script(
        cursor_page([1], "c2"),
        ScriptedResponse.too_many_requests(retry_after=2),
        cursor_page([2], "c3"),
        cursor_page([3], None),
    )
    dag_id = dag_id_for(request)

    result = run_source(dag_id, listing_dag(dag_id, tmp_path, wait_kwargs), base_url=scripted_api.base_url)

    task = result.task("fetch")
    assert task.state == "success"
    assert task.try_number == 1, "a rate limit between pages spends no try"
    assert [wait["mode"] for wait in json.loads(read_variable(history_key))] == [mode], \
        "the task left its process for the wait (the fault happened)"
    assert task.reschedules == (1 if mode == "reschedule" else 0)
    assert cursors(scripted_api) == [None, "c2", "c2", "c3"], "page 1 was fetched once"
    assert scripted_api.gaps()[1] >= 2.0, "page 2 was asked again only after Retry-After"
    assert task.xcom == [1, 2, 3]


@pytest.mark.usefixtures("airflow_db")
def test_a_try_cut_on_page_three_is_retried_from_page_three_with_the_same_idempotency_key(request, scripted_api,
                                                                                         tmp_path):
    scripted_api.script(
        cursor_page([1], "c2"),
        cursor_page([2], "c3"),
        ScriptedResponse.close(),  # the connection drops: the try fails as a transient error
        cursor_page([3], None),
    )
    dag_id = dag_id_for(request)

    result = run_source(
        dag_id, listing_dag(dag_id, tmp_path, "method='POST'", "{'retries': 1, 'retry_delay': timedelta(seconds=1)}"),
        base_url=scripted_api.base_url)

    task = result.task("fetch")
    assert len(task.earlier_tries) == 1, "the first try failed (the fault happened)"
    assert task.state == "success" and task.try_number == 2
    sent = scripted_api.requests
    form_cursors = [(parse_qs(r.body.decode()).get("cursor") or [None])[0] for r in sent]  # a POST's data is a form
    assert form_cursors == [None, "c2", "c3", "c3"], "pages 1 and 2 were not sent again"
    keys = [r.header("Idempotency-Key") for r in sent]
    assert keys[2] == keys[3], "page 3 is sent again with its own key"
    assert len(set(keys)) == 3, "each page has another key"
    assert task.xcom == [1, 2, 3]
    assert kept_files(tmp_path) == []


@pytest.mark.usefixtures("airflow_db")
def test_max_pages_stops_the_listing_and_output_path_gets_the_combined_json(request, scripted_api, tmp_path):
    scripted_api.script(cursor_page([1], "c2"), cursor_page([2], "c3"), cursor_page([3], "c4"))
    output = tmp_path / "out" / "items.json"
    dag_id = dag_id_for(request)

    result = run_source(dag_id, listing_dag(dag_id, tmp_path / "pages", f"max_pages=2, output_path={str(output)!r}"),
                        base_url=scripted_api.base_url)

    task = result.task("fetch")
    assert task.state == "success"
    assert cursors(scripted_api) == [None, "c2"]
    assert json.loads(output.read_text()) == [1, 2]
    assert task.xcom == {"path": str(output), "status_code": 200, "bytes": len(output.read_bytes()),
                         "content_type": "application/json", "pages": 2}


@pytest.mark.usefixtures("airflow_db")
def test_a_next_page_on_another_host_is_refused_and_never_requested(request, scripted_api, tmp_path):
    with ScriptedApi() as other_host:
        scripted_api.script(ScriptedResponse(body={"items": [1], "next_url": f"{other_host.base_url}/items?page=2"}))
        dag_id = dag_id_for(request)
        task_source = listing_dag(dag_id, tmp_path, "", "{'retries': 1, 'retry_delay': timedelta(seconds=1)}")
        task_source = task_source.replace("pagination_function=next_cursor", "pagination_function=next_link")

        result = run_source(dag_id, task_source, base_url=scripted_api.base_url)

        task = result.task("fetch")
        assert task.state == "failed"
        assert task.try_number == 1, "refused for good: the same page would link there again"
        assert scripted_api.request_count == 1
        assert other_host.request_count == 0
