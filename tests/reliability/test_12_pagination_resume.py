"""Case 15: a paginated task goes on from the page it stopped at, in a new process, never
fetching again a page it had kept: after its worker was SIGKILLed mid-listing (the retry
goes on), and after a rate limit between pages deferred it (a new task process goes on).

The DAG and the Connection are this module's own: the DAG file is written into the stack's
DAGs folder and the Connection created through the REST API, so the session's stack needs no
change. The server (in this process) answers ``/<dag_id>/pages/<n>`` with that page's item and
the next page's path, holding each answer a moment so the listing is still under way when
the test kills. Each case first proves the fault happened (the kill came mid-listing, with
pages kept and pages left; the task deferred).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.support.embedded_stack import DAGS_FOLDER_ENV
from tests.support.scripted_api import ScriptedResponse

from .helpers import failure_summary
from .servers import RoutedApi

pytestmark = pytest.mark.reliability

CONN_ID = "rel_c15_pages"
DAG_IDS = {"killed": "rel_pages_worker_killed", "deferred": "rel_pages_deferred"}
PAGES = 12
#: How long the server holds each page: 12 pages take about 5 s.
ANSWER_DELAY = 0.4
#: Kill once this many pages are kept (and before all are).
KILL_AFTER = 4
#: The deferred case's page that answers 429 first.
LIMITED_PAGE = 3
RETRY_AFTER = 3

DAG_SOURCE = '''
"""Test DAG of tests/reliability/test_12_pagination_resume.py (written by the test, not part of the project)."""
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from network_requests import NetworkRequestOperator


def next_page(response):
    following = response.json().get("next")
    return {{"endpoint": following}} if following else None


def items_of(response):
    return response.json()["items"]


for dag_id, deferrable in ({dags!r}):
    with DAG(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             tags=["reliability-test"], default_args={{"retries": 1, "retry_delay": timedelta(seconds=2)}}):
        NetworkRequestOperator(
            task_id="pages",
            http_conn_id={conn_id!r},
            endpoint=f"/{{dag_id}}/pages/1",
            pagination_function=next_page,
            response_filter=items_of,
            deferrable=deferrable,
            in_process_wait_threshold=0,
        )
'''


def _page(dag_id: str, number: int) -> ScriptedResponse:
    following = f"/{dag_id}/pages/{number + 1}" if number < PAGES else None
    return ScriptedResponse(body={"items": [number], "next": following}, delay_s=ANSWER_DELAY)


@pytest.fixture(scope="module")
def pages_api(stack):
    """This module's server, Connection and DAGs, registered in the running stack."""
    api = RoutedApi().start()
    for dag_id in DAG_IDS.values():
        for number in range(1, PAGES + 1):
            api.route_default(f"/{dag_id}/pages/{number}", _page(dag_id, number))
    connection = {"connection_id": CONN_ID, "conn_type": "http", "host": "127.0.0.1", "port": api.port, "schema": "http"}
    if stack.rest("GET", f"/api/v2/connections/{CONN_ID}").ok:
        stack.rest_json("PATCH", f"/api/v2/connections/{CONN_ID}", connection)
    else:
        stack.rest_json("POST", "/api/v2/connections", connection)
    dags = tuple((dag_id, case == "deferred") for case, dag_id in DAG_IDS.items())
    source = DAG_SOURCE.format(dags=dags, conn_id=CONN_ID)
    (Path(stack.env[DAGS_FOLDER_ENV]) / "rel_pages_resume.py").write_text(textwrap.dedent(source).lstrip())
    stack.wait_for_dags(DAG_IDS.values(), timeout=180)
    try:
        yield api
    finally:
        api.stop()


def _kept_pages(stack, dag_id: str) -> list[int]:
    """The page numbers kept on disk for ``dag_id``'s task (the default page_checkpoint_folder)."""
    folder = stack.data_dir / ".pages"
    if not folder.exists():
        return []
    return sorted(int(path.stem.split("-")[1]) for path in folder.glob(f"{dag_id}.*/page-*.json"))


def _fetches(api, dag_id: str) -> Counter:
    """How many times each page was requested."""
    prefix = f"/{dag_id}/pages/"
    return Counter(int(request.path[len(prefix):]) for request in api.requests if request.path.startswith(prefix))


def _items(stack, dag_id: str, run_id: str) -> list:
    value = {e["key"]: e["value"] for e in stack.xcom_entries(dag_id, run_id, "pages")}["return_value"]
    return value if isinstance(value, list) else json.loads(value)


def test_a_listing_whose_worker_is_killed_goes_on_in_the_retry_without_fetching_a_kept_page(stack, pages_api):
    dag_id = DAG_IDS["killed"]
    run_id = stack.trigger(dag_id)
    stack.wait_for(f"{KILL_AFTER} pages of {dag_id} kept", lambda: len(_kept_pages(stack, dag_id)) >= KILL_AFTER,
                   timeout=120, interval=0.05)

    pids = stack.wait_for("the task process", lambda: stack.processes_connected_to(pages_api.port), 15, 0.02)
    killed = []
    for pid in pids:
        try:
            described = f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]!r}"
            os.kill(pid, signal.SIGKILL)
            killed.append(described)
        except (ProcessLookupError, psutil.Error):
            pass
    kept_at_kill, fetched_at_kill = set(_kept_pages(stack, dag_id)), _fetches(pages_api, dag_id)
    print(f"\n[case 15] killed the task process {killed} with pages {sorted(kept_at_kill)} kept, "
          f"{sum(fetched_at_kill.values())} fetched")
    assert killed, "the task process was found and killed"
    assert KILL_AFTER <= len(kept_at_kill) < PAGES, "the kill came mid-listing"

    run = stack.wait_for_run(dag_id, run_id, timeout=180)

    ti = stack.task_instance(dag_id, run_id, "pages")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "pages", ti["try_number"]))
    assert ti["try_number"] == 2, "the killed try failed and the retry finished the listing"
    fetched = _fetches(pages_api, dag_id)
    assert set(fetched) == set(range(1, PAGES + 1)), "every page was fetched"
    assert all(fetched[number] == 1 for number in kept_at_kill), f"a kept page was fetched again: {fetched}"
    twice = {number for number, count in fetched.items() if count > 1}
    assert len(twice) <= 1 and twice <= set(fetched_at_kill), f"only the page out at the kill may go twice: {fetched}"
    assert _items(stack, dag_id, run_id) == list(range(1, PAGES + 1))
    assert _kept_pages(stack, dag_id) == [], "the kept pages are removed once the task succeeded"
    assert "going on from page" in stack.task_log(dag_id, run_id, "pages", 2)
    print(f"[case 15] killed: {sum(fetched.values())} requests for {PAGES} pages; fetched twice: {sorted(twice)}")


def test_a_listing_deferred_between_pages_goes_on_in_a_new_process_at_the_page_it_stopped_at(stack, pages_api):
    dag_id = DAG_IDS["deferred"]
    pages_api.route(f"/{dag_id}/pages/{LIMITED_PAGE}", ScriptedResponse.too_many_requests(retry_after=RETRY_AFTER))
    run_id = stack.trigger(dag_id)

    run = stack.wait_for_run(dag_id, run_id, timeout=180)

    ti = stack.task_instance(dag_id, run_id, "pages")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "pages", ti["try_number"]))
    log = stack.task_log(dag_id, run_id, "pages", 1)
    assert "deferred" in log, "the task left its process for the wait (the fault happened)"
    assert ti["try_number"] == 1, "a rate limit spends no try"
    fetched = _fetches(pages_api, dag_id)
    assert fetched == Counter({**{n: 1 for n in range(1, PAGES + 1)}, LIMITED_PAGE: 2}), fetched
    limited = [r for r in pages_api.requests if r.path == f"/{dag_id}/pages/{LIMITED_PAGE}"]
    assert limited[1].received_at - limited[0].received_at >= RETRY_AFTER, "asked again only after Retry-After"
    assert "Pages 1-2 were read before" in log
    assert _items(stack, dag_id, run_id) == list(range(1, PAGES + 1))
